// A debugging aid for crashes inside native code (a segmentation fault in a
// transfer, say): on a fatal signal, print the native stack to stderr, then
// hand the signal to the handler installed before (Python's faulthandler,
// which prints the Python stacks) or to the default action.
#pragma once

namespace dpe::runtime {

// Installs the handler for SIGSEGV, SIGBUS, SIGFPE, SIGILL and SIGABRT; idempotent.
void print_native_stack_on_crash();

}  // namespace dpe::runtime
