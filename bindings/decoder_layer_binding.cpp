// infercept._core.CpuDecoderLayer / CpuDecodeBatch / CpuTokenBatch / CpuDecoderScratch: a
// decode step's layer as one call, another step's as two around its attention
// (cpu_decoder_layer.h). The objects hold the DLPack exports of their tensors, so
// the producer's memory stays alive as long as they do: a layer its weights, a batch its
// step's tensors. Tensors arrive through DLPack (dlpack_view.h): torch is not linked.
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <vector>

#include "bindings.h"
#include "dlpack_view.h"
#include "infercept/cpu_decoder_layer.h"

namespace py = pybind11;

namespace {

using Views = std::vector<std::unique_ptr<DLPackView>>;

const infercept::TensorView& take(Views& views, py::handle object, const char* name) {
  views.push_back(std::make_unique<DLPackView>(object, name));
  return views.back()->view();
}

class Layer {
 public:
  Layer(py::handle input_norm, py::handle qkv_packed, std::optional<py::handle> qkv_bias,
        py::handle o_packed, py::handle post_norm, py::handle gate_up_packed,
        py::handle down_packed, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
        double eps)
      : layer_(take(views_, input_norm, "input_norm"), take(views_, qkv_packed, "qkv_packed"),
               qkv_bias ? &take(views_, *qkv_bias, "qkv_bias") : nullptr,
               take(views_, o_packed, "o_packed"), take(views_, post_norm, "post_norm"),
               take(views_, gate_up_packed, "gate_up_packed"),
               take(views_, down_packed, "down_packed"), num_heads, num_kv_heads, head_dim,
               static_cast<float>(eps)) {}

  const infercept::CpuDecoderLayer& layer() const { return layer_; }

 private:
  Views views_;  // declared first: built before layer_ reads them
  infercept::CpuDecoderLayer layer_;
};

class Tokens {
 public:
  Tokens(py::handle x, py::handle residual, py::handle cos, py::handle sin,
         py::handle slot_mapping)
      : tokens_(infercept::make_cpu_token_batch(
            take(views_, x, "x"), take(views_, residual, "residual"), take(views_, cos, "cos"),
            take(views_, sin, "sin"), take(views_, slot_mapping, "slot_mapping"))) {}

  const infercept::CpuTokenBatch& tokens() const { return tokens_; }

 private:
  Views views_;
  infercept::CpuTokenBatch tokens_;
};

class Batch {
 public:
  Batch(py::handle x, py::handle residual, py::handle cos, py::handle sin,
        py::handle slot_mapping, py::handle block_tables, py::handle context_lens, double scale)
      : batch_(infercept::make_cpu_decode_batch(
            take(views_, x, "x"), take(views_, residual, "residual"), take(views_, cos, "cos"),
            take(views_, sin, "sin"), take(views_, slot_mapping, "slot_mapping"),
            take(views_, block_tables, "block_tables"),
            take(views_, context_lens, "context_lens"), static_cast<float>(scale))) {}

  const infercept::CpuDecodeBatch& batch() const { return batch_; }

 private:
  Views views_;
  infercept::CpuDecodeBatch batch_;
};

void decode(const Layer& layer, const Batch& batch, py::handle key_cache, py::handle value_cache,
            infercept::CpuDecoderScratch& scratch) {
  const DLPackView key_view(key_cache, "key_cache"), value_view(value_cache, "value_cache");
  // Touches no Python object: the tool runtime's and the server's threads may run meanwhile.
  py::gil_scoped_release release;
  layer.layer().decode(batch.batch(), key_view.view(), value_view.view(), scratch);
}

void pre_attention(const Layer& layer, const Tokens& tokens, py::handle key_cache,
                   py::handle value_cache, py::handle qkv) {
  const DLPackView key_view(key_cache, "key_cache"), value_view(value_cache, "value_cache"),
      qkv_view(qkv, "qkv");
  py::gil_scoped_release release;
  layer.layer().pre_attention(tokens.tokens(), key_view.view(), value_view.view(),
                              qkv_view.view());
}

void post_attention(const Layer& layer, const Tokens& tokens, py::handle attention,
                    infercept::CpuDecoderScratch& scratch) {
  const DLPackView attention_view(attention, "attention");
  py::gil_scoped_release release;
  layer.layer().post_attention(tokens.tokens(), attention_view.view(), scratch);
}

}  // namespace

void bind_cpu_decoder_layer(py::module_& m) {
  py::class_<infercept::CpuDecoderScratch>(
      m, "CpuDecoderScratch",
      "Intermediate buffers of CpuDecoderLayer.decode, kept from layer to layer and step to "
      "step (grown on demand). One per model; not for two threads at once.")
      .def(py::init<>());
  py::class_<Layer>(
      m, "CpuDecoderLayer",
      "A Llama decoder layer's weights for a decode step in one native call. Float32 CPU "
      "contiguous tensors: input_norm and post_norm [hidden]; qkv_packed, o_packed, "
      "gate_up_packed, down_packed in pack_linear_weight's layout of [Q + 2 KV, hidden], "
      "[hidden, Q], [2 I, hidden], [hidden, I] (Q = num_heads * head_dim, KV = num_kv_heads * "
      "head_dim, I = intermediate); qkv_bias [Q + 2 KV] or None. Holds the tensors. Raises "
      "InvalidArgumentError (a ValueError) naming a tensor of the wrong dtype, device, shape or "
      "layout.")
      .def(py::init<py::handle, py::handle, std::optional<py::handle>, py::handle, py::handle,
                    py::handle, py::handle, int64_t, int64_t, int64_t, double>(),
           py::arg("input_norm"), py::arg("qkv_packed"), py::arg("qkv_bias"), py::arg("o_packed"),
           py::arg("post_norm"), py::arg("gate_up_packed"), py::arg("down_packed"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"))
      .def("decode", &decode, py::arg("batch"), py::arg("key_cache"), py::arg("value_cache"),
           py::arg("scratch"),
           "Runs the layer on the batch in place: residual += x, the input norm, the qkv GEMM, "
           "RoPE and the K/V write into the caches [num_blocks, block_size, num_kv_heads, "
           "head_dim], paged decode attention, o_proj, the post-attention norm (residual += x "
           "again), gate_up, SwiGLU, down_proj into x. Bit-equal to the per-op path. Releases "
           "the GIL. Raises InvalidArgumentError naming a bad tensor, slot, context length or "
           "block id.")
      .def("pre_attention", &pre_attention, py::arg("tokens"), py::arg("key_cache"),
           py::arg("value_cache"), py::arg("qkv"),
           "The layer before its attention, for any tokens (chunks too), in place on the "
           "tokens' x and residual: residual += x, the input norm, the qkv GEMM into qkv "
           "[num_tokens, num_heads + 2 * num_kv_heads, head_dim] float32 (written), RoPE on its "
           "query and key heads, their K/V into the caches. Releases the GIL. Raises "
           "InvalidArgumentError naming a bad tensor or slot (then nothing is written).")
      .def("post_attention", &post_attention, py::arg("tokens"), py::arg("attention"),
           py::arg("scratch"),
           "The layer after its attention: o_proj of attention [num_tokens, num_heads * "
           "head_dim] float32 (contiguous rows) into x, the post-attention norm (residual += x), "
           "gate_up, SwiGLU, down_proj into x. Releases the GIL. Raises InvalidArgumentError "
           "naming a bad tensor.");
  py::class_<Tokens>(
      m, "CpuTokenBatch",
      "One step's new tokens, shared by every CpuDecoderLayer.pre_attention/post_attention of "
      "the step: x and residual [num_tokens, hidden] float32 (updated in place; residual zeros "
      "before the first layer), cos/sin [num_tokens, head_dim] float32, slot_mapping "
      "[num_tokens] int64, CPU and contiguous. Holds the tensors. Raises InvalidArgumentError "
      "naming a bad tensor.")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle>(), py::arg("x"),
           py::arg("residual"), py::arg("cos"), py::arg("sin"), py::arg("slot_mapping"));
  py::class_<Batch>(
      m, "CpuDecodeBatch",
      "One decode step's tensors, shared by every CpuDecoderLayer.decode of the step: x and "
      "residual [num_seqs, hidden] float32 (updated in place; residual zeros before the first "
      "layer), cos/sin [num_seqs, head_dim] float32, slot_mapping [num_seqs] int64, "
      "block_tables [num_seqs, max_blocks] and context_lens [num_seqs] int32, CPU and "
      "contiguous. Holds the tensors. Raises InvalidArgumentError naming a bad tensor.")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
                    py::handle, double>(),
           py::arg("x"), py::arg("residual"), py::arg("cos"), py::arg("sin"),
           py::arg("slot_mapping"), py::arg("block_tables"), py::arg("context_lens"),
           py::arg("scale"));
}
