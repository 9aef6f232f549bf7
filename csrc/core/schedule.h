// The schedule IR: one instruction set for every pipeline schedule, and the
// generators that produce each stage's instruction stream. This is the only
// place schedule logic lives: the runtime executes these streams, the
// simulator checks them, Python shows and draws them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dpe::core {

enum class Op : uint8_t {
  LoadMicroBatch,
  ForwardPass,
  BackwardPass,    // full backward: input and weight gradients
  BackwardInput,   // B: gradients w.r.t. the stage input only
  BackwardWeight,  // W: gradients w.r.t. the weights (after B of the same micro-batch)
  SendActivation,
  RecvActivation,
  SendGrad,
  RecvGrad,
  ReduceTiedGrads,
  ReduceGrads,
  OptimizerStep,
};
constexpr int kNumOps = 12;

const char* op_name(Op op);
bool op_has_buffer(Op op);  // false for the reductions and the optimizer step

// What an op is, for every tool that shows one: its name ("BackwardInput"),
// its letter in action tokens and timelines ("F", "B", "I", "W"; empty for
// ops that are not compute passes), its profiler label ("backward input"),
// and whether it is a compute pass or a point-to-point transfer.
struct OpInfo {
  const char* name;
  const char* letter;
  const char* label;
  bool is_compute;
  bool is_transfer;
};
const OpInfo& op_info(Op op);

struct Instruction {
  Op op;
  int32_t buffer_id = -1;    // -1 for instructions without a buffer
  int32_t micro_batch = -1;  // which micro-batch the instruction acts on (-1: none)
  int32_t chunk = 0;         // model chunk of the rank (its virtual stage: see ChunkLayout)
  bool operator==(const Instruction& o) const {
    return op == o.op && buffer_id == o.buffer_id && micro_batch == o.micro_batch && chunk == o.chunk;
  }
};

using Step = std::vector<Instruction>;
using Steps = std::vector<Step>;

// An instruction with the step it belongs to: a stream in flat order, as the
// executor runs it and the simulator and the transfer planner walk it.
struct Located {
  int64_t step;
  Instruction instr;
};
std::vector<Located> flatten(const Steps& steps);
// "step 3, ForwardPass (micro-batch 1)": how errors and traces name an instruction.
std::string describe_step(int64_t step, const Instruction& in);

enum class ScheduleKind : uint8_t {
  Train1F1B,        // DeepSpeed's TrainSchedule, instruction for instruction
  Inference,        // DeepSpeed's InferenceSchedule
  DataParallel,     // DeepSpeed's DataParallelSchedule
  GPipe,            // all forwards, then all backwards
  Interleaved1F1B,  // Megatron's virtual pipeline stages, `chunks` per rank
  ZeroBubbleH1,     // ZB-H1: backward split into B and W, W fills the bubbles
  ZeroBubbleV,      // ZB-V: two chunks per rank in a V, split backward
  VHalf,            // V-Half: zb-v's V and split backward, half of 1F1B's peak activations
  VMin,             // V-Min: the same, a third of 1F1B's peak activations
};

// Where a rank's model chunks sit in the pipeline of stages * chunks virtual
// stages. Interleaved (Megatron): chunk c of rank r is virtual stage
// c * stages + r. V (zigzag): even chunks run down the ranks, odd ones back up,
// so chunk c of rank r is c * stages + r for even c and
// c * stages + stages - 1 - r for odd c; with two chunks, rank r holds virtual
// stages r and 2 * stages - 1 - r, and the last rank hands its activation from
// one chunk to the next in memory.
enum class ChunkLayout : uint8_t { Interleaved, V };
ChunkLayout parse_chunk_layout(const std::string& name);  // "interleaved" | "v"; throws otherwise
const char* chunk_layout_name(ChunkLayout layout);
int64_t virtual_stage_of(int64_t rank, int64_t chunk, int64_t stages, ChunkLayout layout);
int64_t rank_of_virtual(int64_t virtual_stage, int64_t stages, ChunkLayout layout);
int64_t chunk_of_virtual(int64_t virtual_stage, int64_t stages);
// The layout a schedule kind runs on (V for zb-v, v-half and v-min, else interleaved).
ChunkLayout layout_of(ScheduleKind kind);

ScheduleKind parse_schedule_kind(const std::string& name);  // throws, listing the names
const char* schedule_kind_name(ScheduleKind kind);
std::vector<std::string> schedule_kind_names();
constexpr int kNumScheduleKinds = 9;

// What a schedule kind is, the one place every check and tool reads it from:
// the layout its chunks sit in, how many model chunks per rank it runs
// (max_chunks 0: no upper bound), whether it splits the backward into B and
// W (then the loss backward is the executor's own), and whether the engine
// trains with it (inference and data-parallel are DeepSpeed's other
// instruction streams, not training schedules one picks).
struct ScheduleKindInfo {
  ScheduleKind kind;
  const char* name;
  ChunkLayout layout;
  int64_t min_chunks, max_chunks;
  bool splits_backward;
  bool trains;
};
const ScheduleKindInfo& schedule_kind_info(ScheduleKind kind);

struct ScheduleSpec {
  ScheduleKind kind = ScheduleKind::Train1F1B;
  int64_t micro_batches = 1;
  int64_t stages = 1;
  int64_t chunks = 1;  // model chunks per rank; > 1 for Interleaved1F1B, the V kinds (2) and Inference
  ChunkLayout layout = ChunkLayout::Interleaved;  // V for the V kinds (and their inference)
};

// Throws std::invalid_argument with a message naming the bad field.
void validate(const ScheduleSpec& spec);
void validate_stage(const ScheduleSpec& spec, int64_t stage_id);

// The steps of one stage, and optionally the activation buffers they use
// (num_pipe_buffers below).
Steps generate_steps(const ScheduleSpec& spec, int64_t stage_id, int64_t* num_buffers = nullptr);
// The steps of every stage (cheaper than calling generate_steps per stage for
// schedules whose construction looks at the whole pipeline), and optionally
// each stage's num_pipe_buffers.
std::vector<Steps> generate_all_steps(const ScheduleSpec& spec, std::vector<int64_t>* num_buffers = nullptr);
// ---------------------------------------------------------------- compute orders
// A schedule written as each rank's compute passes alone, in order; the
// loads, transfers, reductions and optimizer step are added by lowering.
enum class Compute : uint8_t { F, B, BInput, W };
struct ComputeOp {
  Compute what;
  int64_t micro_batch;
  int64_t chunk;
};
using ComputeOrder = std::vector<ComputeOp>;

// The compute passes of each stage's stream, in order.
std::vector<ComputeOrder> compute_orders_of(const std::vector<Steps>& streams);
// Every rank's steps for its compute order (one rank per order, `chunks`
// model chunks each, placed by `layout`); throws std::invalid_argument naming
// the rank and action it cannot lower. Whether the result runs is the
// simulator's to prove.
std::vector<Steps> lower_compute_orders(const std::vector<ComputeOrder>& orders, int64_t micro_batches,
                                        std::vector<int64_t>* num_buffers = nullptr, int64_t chunks = 1,
                                        ChunkLayout layout = ChunkLayout::Interleaved);
// The text form of one action, as torch.distributed.pipelining writes it:
// the virtual stage index, a letter (F forward, B full backward, I input
// backward, W weight backward), the micro-batch: "0F3", "1I0".
std::string format_action(const ComputeOp& op, int64_t stages, int64_t rank,
                          ChunkLayout layout = ChunkLayout::Interleaved);
// One action token's syntax alone (no placement): its virtual stage, pass and
// micro-batch; throws std::invalid_argument naming the rank and the token.
struct ActionToken {
  int64_t virtual_stage;
  Compute what;
  int64_t micro_batch;
};
ActionToken parse_action_token(const std::string& token, int64_t rank = 0);
const char* compute_letter(Compute what);  // "F", "B", "I", "W"
// Parses one action of `rank`'s row; throws std::invalid_argument naming the
// rank, the token and what is wrong with it.
ComputeOp parse_action(const std::string& token, int64_t stages, int64_t rank,
                       ChunkLayout layout = ChunkLayout::Interleaved);

// Activation buffers the stage needs (DeepSpeed's num_pipe_buffers() for the
// DeepSpeed-named schedules; the peak of live buffers for the others).
int64_t num_pipe_buffers(const ScheduleSpec& spec, int64_t stage_id);

// The most chunk micro-batches a rank of a V kind keeps between a forward and
// its weight backward (1F1B's first stage keeps 2 * stages: `stages` whole
// stages). zb-v: 2 * stages; v-half: stages + 1; v-min: ceil(2 * stages / 3)
// + 1 (the one is room for a micro-batch coming back to the rank's second
// chunk). 0 for the other kinds.
int64_t v_activation_limit(ScheduleKind kind, int64_t stages);

}  // namespace dpe::core
