// The C interface: argument checks, context lifetime and launches. Kernels live
// in kernels/; this file only validates and forwards.
#include <new>

#include <cuda_runtime.h>

#include "common/device_guard.h"
#include "common/status.h"
#include "context.h"
#include "hybrid_ep_infer/hybrid_ep_infer.h"
#include "kernels/combine.cuh"
#include "kernels/ll_dispatch.cuh"

#ifndef HEP_VERSION_STRING
#define HEP_VERSION_STRING "unknown"
#endif

namespace hep {

// The part of a kernel parameter block that comes from the attached buffer (the
// same fields in DispatchParams and CombineParams).
template <typename Params>
void fill_buffer_params(const hep_context& context, Params& p) {
  const hep::Sizes& s = context.sizes;
  p.sizes = s;
  p.off = context.offsets;
  p.local = context.workspaces[s.rank];
  for (int r = 0; r < s.world; ++r) p.peers[r] = context.workspaces[r];
  p.errors = context.errors_device;
  p.timeout_ns = context.desc.timeout_ns;
  p.blocks = context.desc.num_sms;
}

}  // namespace hep

extern "C" {

int hep_api_version(void) { return HEP_API_VERSION; }

const char* hep_version_string(void) { return HEP_VERSION_STRING; }

const char* hep_status_string(hep_status_t status) {
  switch (status) {
    case HEP_SUCCESS: return "success";
    case HEP_INVALID_ARGUMENT: return "invalid argument";
    case HEP_CUDA_ERROR: return "CUDA error";
    case HEP_NOT_SUPPORTED: return "not supported";
    case HEP_INTERNAL_ERROR: return "internal error";
  }
  return "unknown status";
}

const char* hep_last_error(void) { return hep::last_error(); }

hep_status_t hep_context_create(const hep_context_config_t* config, hep_context_t** out) {
  hep::clear_last_error();
  HEP_REQUIRE(config != nullptr && out != nullptr, "hep_context_create: config and out must not be NULL");
  HEP_REQUIRE(config->size == sizeof(hep_context_config_t) && config->version == HEP_API_VERSION,
              "hep_context_create: config built for another library version (size %zu, version %u; "
              "this library expects size %zu, version %d)",
              config->size, config->version, sizeof(hep_context_config_t), HEP_API_VERSION);
  *out = nullptr;

  int device_count = 0;
  HEP_CUDA_CALL(cudaGetDeviceCount(&device_count));
  HEP_REQUIRE(config->device >= 0 && config->device < device_count,
              "hep_context_create: device %d out of range (%d visible)", config->device, device_count);
  hep::DeviceGuard guard(config->device);
  HEP_CUDA_CALL(guard.status());

  int major = 0;
  HEP_CUDA_CALL(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, config->device));
  if (major < 9) {
    hep::set_last_error("hep_context_create: device %d has compute capability %d.x; this library is built "
                        "for sm_90a (Hopper) and newer", config->device, major);
    return HEP_NOT_SUPPORTED;
  }

  auto* context = new (std::nothrow) hep_context();
  if (context == nullptr) {
    hep::set_last_error("hep_context_create: out of host memory");
    return HEP_INTERNAL_ERROR;
  }
  context->device = config->device;
  void* host = nullptr;
  cudaError_t err = cudaHostAlloc(&host, sizeof(hep_error_block_t), cudaHostAllocMapped | cudaHostAllocPortable);
  if (err == cudaSuccess) {
    context->errors_host = static_cast<hep_error_block_t*>(host);
    *context->errors_host = hep_error_block_t{};
    void* device_view = nullptr;
    err = cudaHostGetDevicePointer(&device_view, host, 0);
    context->errors_device = static_cast<hep_error_block_t*>(device_view);
  }
  if (err != cudaSuccess) {
    hep::set_last_error("hep_context_create: mapping the error block failed: %s", cudaGetErrorString(err));
    hep_context_destroy(context);
    return HEP_CUDA_ERROR;
  }
  *out = context;
  return HEP_SUCCESS;
}

hep_status_t hep_context_destroy(hep_context_t* context) {
  if (context == nullptr) return HEP_SUCCESS;
  hep_status_t status = HEP_SUCCESS;
  if (context->errors_host != nullptr) {
    cudaError_t err = cudaFreeHost(context->errors_host);
    if (err != cudaSuccess) {
      hep::set_last_error("hep_context_destroy: cudaFreeHost failed: %s", cudaGetErrorString(err));
      status = HEP_CUDA_ERROR;
    }
  }
  delete context;
  return status;
}

hep_status_t hep_context_error_block(hep_context_t* context, const hep_error_block_t** out) {
  HEP_REQUIRE(context != nullptr && out != nullptr, "hep_context_error_block: NULL argument");
  *out = context->errors_host;
  return HEP_SUCCESS;
}

hep_status_t hep_context_take_errors(hep_context_t* context, hep_error_block_t* out) {
  HEP_REQUIRE(context != nullptr && out != nullptr, "hep_context_take_errors: NULL argument");
  // Word by word atomic exchange: a count a kernel adds meanwhile lands either in
  // this snapshot or in the next one, never lost.
  uint32_t* words = reinterpret_cast<uint32_t*>(context->errors_host);
  uint32_t* snapshot = reinterpret_cast<uint32_t*>(out);
  for (size_t i = 0; i < sizeof(hep_error_block_t) / sizeof(uint32_t); ++i) {
    snapshot[i] = __atomic_exchange_n(&words[i], 0u, __ATOMIC_ACQ_REL);
  }
  return HEP_SUCCESS;
}

namespace {

hep_status_t check_desc(const hep_buffer_desc_t* d) {
  HEP_REQUIRE(d != nullptr, "buffer description is NULL");
  HEP_REQUIRE(d->size == sizeof(hep_buffer_desc_t) && d->version == HEP_API_VERSION,
              "buffer description built for another library version (size %zu, version %u)", d->size, d->version);
  HEP_REQUIRE(d->world_size >= 1 && d->world_size <= hep::kMaxRanks, "world_size %d outside [1, %d]", d->world_size,
              hep::kMaxRanks);
  HEP_REQUIRE(d->rank >= 0 && d->rank < d->world_size, "rank %d outside [0, %d)", d->rank, d->world_size);
  HEP_REQUIRE(d->hidden > 0 && d->max_tokens > 0 && d->num_experts > 0 && d->capacity > 0 && d->pad_multiple > 0,
              "hidden, max_tokens, num_experts, capacity and pad_multiple must be positive");
  HEP_REQUIRE(d->num_experts <= hep::kMaxExperts, "num_experts %d above %d (the planning kernels keep per-expert "
              "tables in shared memory)", d->num_experts, hep::kMaxExperts);
  HEP_REQUIRE(d->num_experts % d->world_size == 0, "num_experts %d is not a multiple of world_size %d",
              d->num_experts, d->world_size);
  HEP_REQUIRE(d->top_k >= 1 && d->top_k <= hep::kMaxTopK && d->top_k <= d->num_experts,
              "top_k %d outside [1, min(%d, num_experts)]", d->top_k, hep::kMaxTopK);
  HEP_REQUIRE(d->payload_bytes == 1 || d->payload_bytes == 2, "payload_bytes must be 1 or 2, got %d",
              d->payload_bytes);
  HEP_REQUIRE(((int64_t)d->hidden * d->payload_bytes) % 16 == 0, "a token row (%d x %d bytes) must be a multiple of 16 bytes",
              d->hidden, d->payload_bytes);
  HEP_REQUIRE(!d->has_scales || d->hidden % hep::kScaleBlock == 0, "FP8 scales need hidden %% 128 == 0");
  HEP_REQUIRE(d->layout == HEP_LAYOUT_CONTIGUOUS || d->layout == HEP_LAYOUT_BATCHED, "unknown layout %d", d->layout);
  HEP_REQUIRE(d->layout == HEP_LAYOUT_BATCHED || d->capacity % d->pad_multiple == 0,
              "capacity %d must be a multiple of pad_multiple %d", d->capacity, d->pad_multiple);
  HEP_REQUIRE(d->num_sms >= 1, "num_sms must be >= 1, got %d", d->num_sms);
  HEP_REQUIRE(d->timeout_ns > 0, "timeout_ns must be positive");
  HEP_REQUIRE(d->low_latency == 0 || d->low_latency == 1, "low_latency must be 0 or 1, got %d", d->low_latency);
  HEP_REQUIRE(d->ranks_per_node >= 0 && (d->ranks_per_node == 0 || d->world_size % d->ranks_per_node == 0),
              "ranks_per_node %d must be 0 or divide world_size %d", d->ranks_per_node, d->world_size);
  if (d->ranks_per_node > 0 && d->ranks_per_node < d->world_size) {
    if (!HEP_NETWORK_LEG) {
      hep::set_last_error("ranks_per_node %d below world_size %d: ranks on other nodes are reached only by the "
                          "multi-node library (libhybrid_ep_infer_mn.so)", d->ranks_per_node, d->world_size);
      return HEP_NOT_SUPPORTED;
    }
    HEP_REQUIRE(d->low_latency == 1, "ranks_per_node %d below world_size %d needs low_latency = 1 (the planned "
                "dispatch does not cross nodes)", d->ranks_per_node, d->world_size);
  }
  return HEP_SUCCESS;
}

// Across nodes, the tuning must keep the low-latency dispatch and one-token combine
// chunks (a put signals one token's partial; combine.cu).
hep_status_t check_tuning_across_nodes(const hep::Sizes& s, const hep_tuning_t& t) {
  if (!s.spans_nodes()) return HEP_SUCCESS;
  HEP_REQUIRE(t.dispatch_path == HEP_DISPATCH_LOW_LATENCY && t.combine_chunk_tokens == 1,
              "across nodes the tuning keeps dispatch_path = HEP_DISPATCH_LOW_LATENCY and combine_chunk_tokens = 1 "
              "(got %d and %d)", t.dispatch_path, t.combine_chunk_tokens);
  return HEP_SUCCESS;
}

}  // namespace

hep_status_t hep_workspace_layout(const hep_buffer_desc_t* desc, hep_workspace_layout_t* out) {
  hep::clear_last_error();
  HEP_REQUIRE(out != nullptr, "hep_workspace_layout: out is NULL");
  hep_status_t status = check_desc(desc);
  if (status != HEP_SUCCESS) return status;
  const hep::WorkspaceOffsets o = hep::make_offsets(hep::make_sizes(*desc));
  out->total_bytes = o.total;
  out->hidden = o.hidden;
  out->scales = o.scales;
  out->weights = o.weights;
  out->row_expert = o.row_expert;
  out->tokens_per_expert = o.tokens_per_expert;
  out->offsets = o.offsets;
  out->combine_out = o.combine_out;
  return HEP_SUCCESS;
}

hep_status_t hep_context_attach(hep_context_t* context, const hep_buffer_desc_t* desc, void* const* workspaces) {
  hep::clear_last_error();
  HEP_REQUIRE(context != nullptr && workspaces != nullptr, "hep_context_attach: NULL argument");
  HEP_REQUIRE(!context->attached, "hep_context_attach: a buffer is already attached to this context");
  hep_status_t status = check_desc(desc);
  if (status != HEP_SUCCESS) return status;
  for (int r = 0; r < desc->world_size; ++r) {
    HEP_REQUIRE(workspaces[r] != nullptr && reinterpret_cast<uintptr_t>(workspaces[r]) % 128 == 0,
                "workspace of rank %d is NULL or not 128-byte aligned", r);
    context->workspaces[r] = workspaces[r];
  }
  // The copy kernels' blocks wait on each other (a block's expanders on another block's
  // senders), so every block must be resident at once: at most one per SM.
  int sm_count = 0;
  HEP_CUDA_CALL(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, context->device));
  HEP_REQUIRE(desc->num_sms <= sm_count, "num_sms %d exceeds the %d SMs of device %d", desc->num_sms, sm_count,
              context->device);
  {
    hep::DeviceGuard guard(context->device);
    HEP_CUDA_CALL(guard.status());
    HEP_CUDA_CALL(hep::prepare_transfer_kernel());
    HEP_CUDA_CALL(hep::prepare_plan_kernels());
    HEP_CUDA_CALL(hep::prepare_ll_dispatch());
  }
  const hep::Sizes sizes = hep::make_sizes(*desc);
  if (desc->low_latency) {
    int optin = 0;
    HEP_CUDA_CALL(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, context->device));
    const size_t need = hep::ll_receive_shared_bytes(sizes);
    HEP_REQUIRE(need + 1024 <= static_cast<size_t>(optin),
                "low_latency: the receive's plan tables need %zu bytes of shared memory per block (world_size %d, "
                "num_experts %d, max_tokens %d); the device allows %d. Use a smaller max_tokens or low_latency = 0",
                need, desc->world_size, desc->num_experts, desc->max_tokens, optin - 1024);
  }
  context->desc = *desc;
  context->sizes = sizes;
  context->offsets = hep::make_offsets(context->sizes);
  context->tuning = hep::default_tuning();
  if (desc->low_latency) context->tuning.dispatch_path = HEP_DISPATCH_LOW_LATENCY;
  status = check_tuning_across_nodes(sizes, context->tuning);
  if (status != HEP_SUCCESS) return status;
  context->attached = true;
  return HEP_SUCCESS;
}

hep_status_t hep_context_set_tuning(hep_context_t* context, const hep_tuning_t* tuning) {
  hep::clear_last_error();
  HEP_REQUIRE(context != nullptr && tuning != nullptr, "hep_context_set_tuning: NULL argument");
  HEP_REQUIRE(context->attached, "hep_context_set_tuning: no buffer attached to this context");
  HEP_REQUIRE(tuning->size == sizeof(hep_tuning_t) && tuning->version == HEP_API_VERSION,
              "hep_context_set_tuning: tuning built for another library version (size %zu, version %u)", tuning->size,
              tuning->version);
  const int warps = hep::kCopyWarps, T = context->sizes.max_tokens;
  HEP_REQUIRE(tuning->dispatch_send_warps >= 1 && tuning->dispatch_send_warps < warps,
              "dispatch_send_warps %d outside [1, %d]", tuning->dispatch_send_warps, warps - 1);
  HEP_REQUIRE(tuning->combine_reduce_warps >= 1 && tuning->combine_reduce_warps < warps,
              "combine_reduce_warps %d outside [1, %d]", tuning->combine_reduce_warps, warps - 1);
  HEP_REQUIRE(tuning->dispatch_chunk_tokens >= 1 && tuning->dispatch_chunk_tokens <= T,
              "dispatch_chunk_tokens %d outside [1, max_tokens = %d]", tuning->dispatch_chunk_tokens, T);
  HEP_REQUIRE(tuning->combine_chunk_tokens >= 1 && tuning->combine_chunk_tokens <= T,
              "combine_chunk_tokens %d outside [1, max_tokens = %d]", tuning->combine_chunk_tokens, T);
  HEP_REQUIRE(tuning->dispatch_expand_tma == 0 || tuning->dispatch_expand_tma == 1,
              "dispatch_expand_tma must be 0 or 1, got %d", tuning->dispatch_expand_tma);
  HEP_REQUIRE(tuning->dispatch_send_tma == 0 || tuning->dispatch_send_tma == 1,
              "dispatch_send_tma must be 0 or 1, got %d", tuning->dispatch_send_tma);
  HEP_REQUIRE(tuning->dispatch_path == HEP_DISPATCH_PLANNED ||
                  (tuning->dispatch_path == HEP_DISPATCH_LOW_LATENCY && context->desc.low_latency),
              "dispatch_path %d is not HEP_DISPATCH_PLANNED, or HEP_DISPATCH_LOW_LATENCY on a low_latency buffer",
              tuning->dispatch_path);
  const hep_status_t status = check_tuning_across_nodes(context->sizes, *tuning);
  if (status != HEP_SUCCESS) return status;
  context->tuning = *tuning;
  return HEP_SUCCESS;
}

hep_status_t hep_context_get_tuning(hep_context_t* context, hep_tuning_t* out) {
  hep::clear_last_error();
  HEP_REQUIRE(context != nullptr && out != nullptr, "hep_context_get_tuning: NULL argument");
  HEP_REQUIRE(context->attached, "hep_context_get_tuning: no buffer attached to this context");
  *out = context->tuning;
  return HEP_SUCCESS;
}

namespace {

const char* pending_name(hep_context::Pending pending) {
  return pending == hep_context::Pending::kDispatch ? "hep_dispatch_send" : "hep_combine_send";
}

// Checks a dispatch's arguments and fills its kernel parameters.
hep_status_t prepare_dispatch(const char* what, hep_context_t* context, const hep_dispatch_args_t* args,
                              hep::DispatchParams& p) {
  HEP_REQUIRE(context != nullptr && args != nullptr, "%s: NULL argument", what);
  HEP_REQUIRE(context->attached, "%s: no buffer attached to this context", what);
  const hep::Sizes& s = context->sizes;
  HEP_REQUIRE(args->num_rows >= 0 && args->num_rows <= s.max_tokens, "%s: num_rows %d outside [0, %d]", what,
              args->num_rows, s.max_tokens);
  HEP_REQUIRE(args->num_tokens_device != nullptr ||
                  (args->num_tokens_host >= 0 && args->num_tokens_host <= args->num_rows),
              "%s: num_tokens_host %d outside [0, %d]", what, args->num_tokens_host, args->num_rows);
  HEP_REQUIRE(args->idx_dtype == HEP_INDEX_INT32 || args->idx_dtype == HEP_INDEX_INT64, "%s: bad idx_dtype", what);
  HEP_REQUIRE(args->num_rows == 0 || (args->x && args->topk_idx && args->topk_weights),
              "%s: x, topk_idx and topk_weights must not be NULL", what);
  HEP_REQUIRE(s.scale_cols == 0 || args->num_rows == 0 || args->scales != nullptr,
              "%s: this buffer carries FP8 scales; scales must not be NULL", what);
  HEP_REQUIRE(context->pending == hep_context::Pending::kNone, "%s: %s is pending; call its receive half first", what,
              pending_name(context->pending));

  hep::fill_buffer_params(*context, p);
  p.send_warps = context->tuning.dispatch_send_warps;
  p.chunk_tokens = context->tuning.dispatch_chunk_tokens;
  p.expand_tma = context->tuning.dispatch_expand_tma;
  p.send_tma = context->tuning.dispatch_send_tma;
  p.x = args->x;
  p.scales = args->scales;
  p.topk_idx = args->topk_idx;
  p.idx_is_int64 = args->idx_dtype == HEP_INDEX_INT64;
  p.topk_weights = args->topk_weights;
  p.num_rows = args->num_rows;
  p.num_tokens_device = args->num_tokens_device;
  p.num_tokens_host = args->num_tokens_host;
  return HEP_SUCCESS;
}

}  // namespace

hep_status_t hep_dispatch(hep_context_t* context, const hep_dispatch_args_t* args, uint64_t stream) {
  hep::clear_last_error();
  hep::DispatchParams p{};
  hep_status_t status = prepare_dispatch("hep_dispatch", context, args, p);
  if (status != HEP_SUCCESS) return status;
  hep::DeviceGuard guard(context->device);
  HEP_CUDA_CALL(guard.status());
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (context->tuning.dispatch_path == HEP_DISPATCH_LOW_LATENCY) {
    HEP_CUDA_CALL(hep::launch_ll_dispatch(p, hep::kLowLatencyBoth, s));
  } else {
    HEP_CUDA_CALL(hep::launch_dispatch(p, s));
  }
  return HEP_SUCCESS;
}

hep_status_t hep_dispatch_send(hep_context_t* context, const hep_dispatch_args_t* args, uint64_t stream) {
  hep::clear_last_error();
  hep::DispatchParams p{};
  hep_status_t status = prepare_dispatch("hep_dispatch_send", context, args, p);
  if (status != HEP_SUCCESS) return status;
  HEP_REQUIRE(context->desc.low_latency, "hep_dispatch_send: the buffer was built without low_latency");
  hep::DeviceGuard guard(context->device);
  HEP_CUDA_CALL(guard.status());
  HEP_CUDA_CALL(hep::launch_ll_dispatch(p, hep::kLowLatencySend, reinterpret_cast<cudaStream_t>(stream)));
  context->pending = hep_context::Pending::kDispatch;
  return HEP_SUCCESS;
}

hep_status_t hep_dispatch_recv(hep_context_t* context, uint64_t stream) {
  hep::clear_last_error();
  HEP_REQUIRE(context != nullptr, "hep_dispatch_recv: NULL argument");
  HEP_REQUIRE(context->pending == hep_context::Pending::kDispatch, "hep_dispatch_recv: no hep_dispatch_send is pending%s",
              context->pending == hep_context::Pending::kCombine ? " (hep_combine_send is)" : "");
  context->pending = hep_context::Pending::kNone;  // consumed, launched or not (as the caller sees it)
  hep::DispatchParams p{};
  hep::fill_buffer_params(*context, p);  // the receive reads only the workspace
  hep::DeviceGuard guard(context->device);
  HEP_CUDA_CALL(guard.status());
  HEP_CUDA_CALL(hep::launch_ll_dispatch(p, hep::kLowLatencyReceive, reinterpret_cast<cudaStream_t>(stream)));
  return HEP_SUCCESS;
}

namespace {

// Checks a combine's arguments and fills its kernel parameters.
hep_status_t prepare_combine(const char* what, hep_context_t* context, const hep_combine_args_t* args,
                             hep::CombineParams& p) {
  HEP_REQUIRE(context != nullptr && args != nullptr, "%s: NULL argument", what);
  HEP_REQUIRE(context->attached, "%s: no buffer attached to this context", what);
  const hep::Sizes& s = context->sizes;
  HEP_REQUIRE(args->num_rows >= 0 && args->num_rows <= s.max_tokens, "%s: num_rows %d outside [0, %d]", what,
              args->num_rows, s.max_tokens);
  HEP_REQUIRE(args->y != nullptr && (args->num_rows == 0 || args->out != nullptr), "%s: y or out is NULL", what);
  HEP_REQUIRE(reinterpret_cast<uintptr_t>(args->y) % 16 == 0 && reinterpret_cast<uintptr_t>(args->out) % 16 == 0,
              "%s: y and out must be 16-byte aligned", what);
  HEP_REQUIRE(args->topk_idx == nullptr || args->idx_dtype == HEP_INDEX_INT32 || args->idx_dtype == HEP_INDEX_INT64,
              "%s: bad idx_dtype", what);
  HEP_REQUIRE(context->pending == hep_context::Pending::kNone, "%s: %s is pending; call its receive half first", what,
              pending_name(context->pending));

  hep::fill_buffer_params(*context, p);
  p.reduce_warps = context->tuning.combine_reduce_warps;
  p.chunk_tokens = context->tuning.combine_chunk_tokens;
  p.roles = hep::kCombineBoth;
  p.y = args->y;
  p.out = args->out;
  p.num_rows = args->num_rows;
  p.weighted = args->weighted != 0;
  p.topk_idx = args->topk_idx;
  p.idx_is_int64 = args->idx_dtype == HEP_INDEX_INT64;
  return HEP_SUCCESS;
}

}  // namespace

hep_status_t hep_combine(hep_context_t* context, const hep_combine_args_t* args, uint64_t stream) {
  hep::clear_last_error();
  hep::CombineParams p{};
  hep_status_t status = prepare_combine("hep_combine", context, args, p);
  if (status != HEP_SUCCESS) return status;
  hep::DeviceGuard guard(context->device);
  HEP_CUDA_CALL(guard.status());
  HEP_CUDA_CALL(hep::launch_combine(p, reinterpret_cast<cudaStream_t>(stream)));
  return HEP_SUCCESS;
}

hep_status_t hep_combine_send(hep_context_t* context, const hep_combine_args_t* args, uint64_t stream) {
  hep::clear_last_error();
  hep::CombineParams p{};
  hep_status_t status = prepare_combine("hep_combine_send", context, args, p);
  if (status != HEP_SUCCESS) return status;
  hep::DeviceGuard guard(context->device);
  HEP_CUDA_CALL(guard.status());
  p.roles = hep::kCombineReduce;
  HEP_CUDA_CALL(hep::launch_combine(p, reinterpret_cast<cudaStream_t>(stream)));
  // The receive half reads no input of the call: the send checked the routing.
  p.roles = hep::kCombineGather;
  p.stale_verdict = p.topk_idx != nullptr;
  p.topk_idx = nullptr;
  p.y = nullptr;
  context->pending_combine = p;
  context->pending = hep_context::Pending::kCombine;
  return HEP_SUCCESS;
}

hep_status_t hep_combine_recv(hep_context_t* context, uint64_t stream) {
  hep::clear_last_error();
  HEP_REQUIRE(context != nullptr, "hep_combine_recv: NULL argument");
  HEP_REQUIRE(context->pending == hep_context::Pending::kCombine, "hep_combine_recv: no hep_combine_send is pending%s",
              context->pending == hep_context::Pending::kDispatch ? " (hep_dispatch_send is)" : "");
  context->pending = hep_context::Pending::kNone;  // consumed, launched or not (as the caller sees it)
  hep::DeviceGuard guard(context->device);
  HEP_CUDA_CALL(guard.status());
  HEP_CUDA_CALL(hep::launch_combine(context->pending_combine, reinterpret_cast<cudaStream_t>(stream)));
  return HEP_SUCCESS;
}

}  // extern "C"

#ifdef HEP_PHASE_CLOCK
// Profiling builds only (cmake -DHEP_PHASE_CLOCK=ON; benchmarks/phase_clock.py): the phase
// marks of kernel 0 (the low-latency dispatch) or 1 (combine) on the current device since
// the last read, then cleared. out[m]: the earliest %globaltimer (ns) at mark m, out[8 + m]:
// the latest; 0 where no block passed it. Synchronous.
extern "C" HEP_API hep_status_t hep_phase_clock_read(int kernel, unsigned long long* out) {
  hep::clear_last_error();
  HEP_REQUIRE(out != nullptr && (kernel == 0 || kernel == 1), "hep_phase_clock_read: kernel 0 or 1 and an out array");
  HEP_CUDA_CALL(kernel == 0 ? hep::read_ll_dispatch_phase_clock(out) : hep::read_combine_phase_clock(out));
  return HEP_SUCCESS;
}
#endif
