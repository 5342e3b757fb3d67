//! AdamW (decoupled weight decay, as PyTorch's), global-norm gradient clipping, and the
//! learning-rate schedules. Optimizer state is plain tensors so checkpoints can save it.

use candle_core::{Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Learning rate at `step` (0-based) of `total`: linear warmup, then the schedule.
pub fn lr_at(schedule: Schedule, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let f = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * f)?;
        }
    }
    Ok(norm)
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (for bias correction).
    pub t: usize,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(
        vars: &[&Var],
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
    ) -> candle_core::Result<Self> {
        let zeros = |v: &&Var| v.as_tensor().zeros_like();
        Ok(Self {
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&self.m[i] / c1)?;
            let v_hat = (&self.v[i] / c2)?;
            let theta = var.as_tensor();
            let decayed = (theta * (1.0 - lr * self.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_warm_up_then_decay() {
        assert!((lr_at(Schedule::Cosine, 1.0, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!(lr_at(Schedule::Cosine, 1.0, 99, 100, 10) < 0.01);
        assert!((lr_at(Schedule::Linear, 1.0, 55, 100, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 0.3, 80, 100, 0), 0.3);
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> candle_core::Result<()> {
        let mut g = vec![
            Tensor::new(&[3f32, 0.0], &Device::Cpu)?,
            Tensor::new(&[4f32], &Device::Cpu)?,
        ];
        let before = clip_global_norm(&mut g, 1.0)?;
        assert!((before - 5.0).abs() < 1e-6);
        let after = clip_global_norm(&mut g, 10.0)?;
        assert!((after - 1.0).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn adamw_first_step_moves_by_lr_against_the_gradient() -> candle_core::Result<()> {
        let v = Var::new(&[1f32, -1.0], &Device::Cpu)?;
        let mut opt = AdamW::new(&[&v], 0.9, 0.999, 0.0)?;
        opt.step(&[&v], &[Tensor::new(&[0.5f32, -2.0], &Device::Cpu)?], 0.1)?;
        let x: Vec<f32> = v.as_tensor().to_vec1()?;
        assert!(
            (x[0] - 0.9).abs() < 1e-5 && (x[1] + 0.9).abs() < 1e-5,
            "{x:?}"
        );
        Ok(())
    }
}
