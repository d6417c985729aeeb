//! Losses over masked positions: cross-entropy against the data, and the divergence from the
//! base model's own predictions (the anchor term that keeps an adapter close to the base).

use candle_core::{D, Tensor};

use crate::TrainError;
use crate::model::{log_softmax_last, softmax_last};

/// Mean cross-entropy of `logits: [batch, time, vocab]` against `targets: [batch * time]` over
/// the positions whose `weights` are 1 (`count` of them).
pub fn masked_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    count: usize,
) -> Result<Tensor, TrainError> {
    if count == 0 {
        return Err(TrainError::Data("a batch has no loss targets".into()));
    }
    let v = logits.dim(D::Minus1)?;
    let logp = log_softmax_last(&logits.reshape(((), v))?)?;
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    Ok(((nll * weights)?.sum_all()? / count as f64)?)
}

/// Mean KL divergence `KL(base ‖ model)` per weighted position, where `base_logits` are the
/// frozen base model's logits for the same inputs (treated as constants).
pub fn masked_kl_to_base(
    logits: &Tensor,
    base_logits: &Tensor,
    weights: &Tensor,
    count: usize,
) -> Result<Tensor, TrainError> {
    if count == 0 {
        return Err(TrainError::Data("an anchor batch has no positions".into()));
    }
    let v = logits.dim(D::Minus1)?;
    let base = base_logits.reshape(((), v))?.detach();
    let p = softmax_last(&base)?;
    let log_p = log_softmax_last(&base)?;
    let log_q = log_softmax_last(&logits.reshape(((), v))?)?;
    let kl = (p * (log_p - log_q)?)?.sum(1)?;
    Ok(((kl * weights)?.sum_all()? / count as f64)?)
}

/// The value of a scalar loss tensor.
pub fn scalar(loss: &Tensor) -> Result<f64, TrainError> {
    Ok(loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_formula_and_ignores_masked_rows() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[1f32, 2., 3.], [0., 0., 5.]]], &dev).unwrap();
        let targets = Tensor::new(&[2u32, 0], &dev).unwrap();
        let weights = Tensor::new(&[1f32, 0.], &dev).unwrap();
        let got = scalar(&masked_cross_entropy(&logits, &targets, &weights, 1).unwrap()).unwrap();
        let want = -(3f64.exp() / (1f64.exp() + 2f64.exp() + 3f64.exp())).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let kl = masked_kl_to_base(&logits, &logits, &weights, 1).unwrap();
        assert!(scalar(&kl).unwrap().abs() < 1e-6);
    }
}
