// AdamW and grad-norm clipping over flat buffers (see optimizer.h).
#include "engine/optimizer.h"

#include <cmath>

namespace aha::engine {

double ClipGradNorm(Backend* backend, float* grads, size_t n, double max_norm) {
  const double norm = std::sqrt(backend->SumSquares(grads, n));
  if (max_norm > 0 && norm > max_norm) backend->Scale(grads, static_cast<float>(max_norm / (norm + 1e-6)), n);
  return norm;
}

AdamW::AdamW(Transformer* model, AdamWOptions options) : model_(model), opt_(std::move(options)) {
  const int64_t n = static_cast<int64_t>(model->num_params());
  m_ = Tensor::Zeros(DType::kF32, {n}, model->backend()->device());
  v_ = Tensor::Zeros(DType::kF32, {n}, model->backend()->device());
}

void AdamW::Step() { Step(opt_.lr); }

void AdamW::Step(float lr) {
  ++t_;
  Backend* b = model_->backend();
  // Consecutive parameters with the same weight decay are one contiguous run of the flat buffers:
  // one update call per run (a handful per model instead of one per tensor).
  const auto& table = model_->param_table();
  size_t i = 0;
  while (i < table.size()) {
    auto decay = [&](const ParamInfo& p) {
      return (!opt_.decay_filter || opt_.decay_filter(p.name)) ? opt_.weight_decay : 0.0f;
    };
    const float wd = decay(table[i]);
    size_t j = i + 1;
    while (j < table.size() && decay(table[j]) == wd) ++j;
    const size_t offset = table[i].offset, n = table[j - 1].offset + table[j - 1].numel() - offset;
    b->AdamW(model_->params() + offset, model_->grads() + offset, m_.f32() + offset, v_.f32() + offset, n, lr,
             opt_.beta1, opt_.beta2, opt_.eps, wd, t_);
    i = j;
  }
  model_->ParamsChanged();
}

}  // namespace aha::engine
