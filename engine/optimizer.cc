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
  for (const ParamInfo& p : model_->param_table()) {
    const float wd = (!opt_.decay_filter || opt_.decay_filter(p.name)) ? opt_.weight_decay : 0.0f;
    b->AdamW(model_->params() + p.offset, model_->grads() + p.offset, m_.f32() + p.offset, v_.f32() + p.offset,
             p.numel(), lr, opt_.beta1, opt_.beta2, opt_.eps, wd, t_);
  }
}

}  // namespace aha::engine
