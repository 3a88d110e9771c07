// What an opaque hep_context_t holds. Grows with each backend feature; every
// member is created in hep_context_create and released in hep_context_destroy.
#pragma once

#include "hybrid_ep_infer/hybrid_ep_infer.h"
#include "kernels/combine.cuh"
#include "kernels/dispatch.cuh"
#include "workspace.h"

struct hep_context {
  int device = -1;
  hep_error_block_t* errors_host = nullptr;    // cudaHostAlloc'd, mapped
  hep_error_block_t* errors_device = nullptr;  // the device's address of the same memory

  // Set by hep_context_attach: the buffer and every rank's workspace (owned by the caller).
  bool attached = false;
  hep_buffer_desc_t desc{};
  hep::Sizes sizes{};
  hep::WorkspaceOffsets offsets{};
  void* workspaces[hep::kMaxRanks] = {};
  hep_tuning_t tuning{};  // set to the defaults by attach

  // The split halves: which send is waiting for its receive (host-side bookkeeping of
  // the calls made, so it also holds while a CUDA graph is being captured), and the
  // combine send's parameters, which its receive launches with.
  enum class Pending { kNone, kDispatch, kCombine };
  Pending pending = Pending::kNone;
  hep::CombineParams pending_combine{};
};
