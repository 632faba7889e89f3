// Test-only: what csrc/dispatch.cpp defines for the module and the emulated AVX-512 unit asks for
// (kernels.h, DecodeStreaming), here a plain setting, so that a harness can run decode both ways.
// Included by one source of each harness executable.
#pragma once

#include "kernels.h"

namespace lfm {
namespace {
DecodeStreaming g_decode_streaming = DecodeStreaming::kPrefetchL2;
}  // namespace

DecodeStreaming decode_streaming() { return g_decode_streaming; }
void set_decode_streaming(DecodeStreaming streaming) { g_decode_streaming = streaming; }

}  // namespace lfm
