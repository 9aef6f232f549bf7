#include "runtime/tensor_parallel_split.h"

#include <c10/util/Exception.h>

#include <vector>

namespace dpe::runtime {

TensorParallelSplit::TensorParallelSplit(c10::intrusive_ptr<c10d::ProcessGroup> group,
                                         std::chrono::milliseconds timeout, std::string self_name)
    : group_(std::move(group)), timeout_(timeout), self_name_(std::move(self_name)) {
  TORCH_CHECK(group_, "TensorParallelSplit needs the tensor-parallel process group");
}

Activation TensorParallelSplit::split(const Activation& value) const {
  TORCH_CHECK(!value.tensors.empty(), self_name_, ": nothing to send");
  const at::Tensor& first = value.tensors[0];
  const bool splits = first.is_floating_point() && size() > 1;
  std::vector<int64_t> meta{splits ? 1 : 0, value.is_tuple ? 1 : 0, first.dim()};
  meta.insert(meta.end(), first.sizes().begin(), first.sizes().end());
  Activation out{{}, /*is_tuple=*/true};
  out.tensors.push_back(at::tensor(meta, at::TensorOptions().dtype(at::kLong)).to(first.device()));
  if (splits) {
    const int64_t n = first.numel(), parts = size(), share = (n + parts - 1) / parts;
    const int64_t start = std::min(n, share * group_->getRank()), length = std::min(share, n - start);
    at::Tensor flat = first.detach().reshape({-1});
    at::Tensor mine = at::zeros({share}, flat.options());
    if (length > 0) mine.narrow(0, 0, length).copy_(flat.narrow(0, start, length));
    out.tensors.push_back(std::move(mine));
  } else {
    out.tensors.push_back(first);
  }
  for (size_t i = 1; i < value.tensors.size(); ++i) out.tensors.push_back(value.tensors[i]);
  return out;
}

Activation TensorParallelSplit::gather(const Activation& received, const std::string& what) const {
  TORCH_CHECK(received.tensors.size() >= 2 && received.tensors[0].scalar_type() == at::kLong, self_name_, ": ", what,
              " arrived without the meta of a split tensor; every stage must use the same "
              "\"pipeline\": {\"pipe_partitioned\", \"grad_partitioned\"} settings");
  const at::Tensor meta_tensor = received.tensors[0].cpu();
  const int64_t* meta = meta_tensor.data_ptr<int64_t>();
  const bool splits = meta[0] != 0;
  Activation out{{}, meta[1] != 0, received.owned};
  std::vector<int64_t> shape(meta + 3, meta + 3 + meta[2]);
  if (!splits) {
    out.tensors.push_back(received.tensors[1]);
  } else {
    at::Tensor mine = received.tensors[1].contiguous();
    const int64_t share = mine.numel();
    at::Tensor whole = at::empty({share * size()}, mine.options());
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < size(); ++r) outputs[0].push_back(whole.narrow(0, r * share, share));
    std::vector<at::Tensor> inputs{mine};
    try {
      auto work = group_->allgather(outputs, inputs);
      TORCH_CHECK(work->wait(timeout_), "aborted");
    } catch (const std::exception& err) {
      TORCH_CHECK(false, self_name_, ": gathering ", what, " from the tensor-parallel ranks of this stage failed (",
                  "timeout ", timeout_.count() / 1000.0, " s): ", err.what());
    }
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    out.tensors.push_back(whole.narrow(0, 0, n).view(shape));
  }
  for (size_t i = 2; i < received.tensors.size(); ++i) out.tensors.push_back(received.tensors[i]);
  return out;
}

}  // namespace dpe::runtime
