#include "runtime/crash_stack.h"

#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstring>
#include <mutex>

namespace dpe::runtime {

namespace {

constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
constexpr int kNumSignals = sizeof(kSignals) / sizeof(kSignals[0]);
struct sigaction previous[kNumSignals];

void on_fatal_signal(int sig, siginfo_t* info, void* context) {
  static const char header[] = "\ndeepspeed_pipe_ext: fatal signal; native stack, most recent call first:\n";
  (void)!write(STDERR_FILENO, header, sizeof(header) - 1);
  void* frames[64];
  const int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  for (int i = 0; i < kNumSignals; ++i) {
    if (kSignals[i] != sig) continue;
    sigaction(sig, &previous[i], nullptr);  // the earlier handler, or the default action
    const struct sigaction& before = previous[i];
    if ((before.sa_flags & SA_SIGINFO) && before.sa_sigaction != nullptr) {
      before.sa_sigaction(sig, info, context);
      return;
    }
    if (!(before.sa_flags & SA_SIGINFO) && before.sa_handler != SIG_DFL && before.sa_handler != SIG_IGN) {
      before.sa_handler(sig);
      return;
    }
  }
  raise(sig);  // the default action, restored above: the process ends with this signal
}

}  // namespace

void print_native_stack_on_crash() {
  static std::once_flag once;
  std::call_once(once, [] {
    void* warm[1];
    backtrace(warm, 1);  // loads the unwinder now: the first call may allocate, which a handler must not
    struct sigaction action;
    std::memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_fatal_signal;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < kNumSignals; ++i) sigaction(kSignals[i], &action, &previous[i]);
  });
}

}  // namespace dpe::runtime
