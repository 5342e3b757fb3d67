//! The normalized Walsh–Hadamard transform of one head's row: an orthogonal rotation that is its
//! own inverse and spreads a few large channels over all of them. Quantizing a rotated key or
//! value row to int8 with one scale per row then loses far less than quantizing the row itself
//! (Llama keys have outlier channels that set the scale), and attention stays exact in exact
//! arithmetic: `(Hq)·(Hk) = q·k`, and `Σ p·(Hv) = H Σ p·v`.

/// Rotates `x` in place (its length a power of two; other lengths are left as they are).
pub fn rotate(x: &mut [f32]) {
    let n = x.len();
    if !rotates(n) {
        return;
    }
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*u + *v, *u - *v);
                *u = s;
                *v = d;
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= norm);
}

/// Rotates each `head_dim`-wide head of `rows` in place.
pub fn rotate_heads(rows: &mut [f32], head_dim: usize) {
    if rotates(head_dim) {
        rows.chunks_exact_mut(head_dim).for_each(rotate);
    }
}

/// Whether rows of `n` are rotated (a power of two above 1).
pub fn rotates(n: usize) -> bool {
    n > 1 && n.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_orthogonal_and_its_own_inverse() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 3.0)
            .collect();
        let y: Vec<f32> = (0..64)
            .map(|i| ((i * 11 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let (mut hx, mut hy) = (x.clone(), y.clone());
        rotate(&mut hx);
        rotate(&mut hy);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
        assert!((dot(&x, &y) - dot(&hx, &hy)).abs() < 1e-4);
        assert!(hx.iter().zip(&x).any(|(a, b)| (a - b).abs() > 0.1));
        rotate(&mut hx);
        for (a, b) in hx.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn spreads_one_outlier_channel_over_all() {
        let mut x = vec![0.01f32; 64];
        x[5] = 40.0;
        rotate(&mut x);
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max < 5.1, "{max}");
    }
}
