//! Which CPU kernels this machine runs: the AVX2 + FMA paths (NF4 decoding, adapter deltas)
//! are taken when the CPU reports both, checked once. `LORAPLEX_NO_SIMD=1` turns them off, for
//! comparing against the portable paths.

/// Whether the AVX2 + FMA kernels run here.
pub fn avx2_fma() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("LORAPLEX_NO_SIMD").is_ok_and(|v| v == "1") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}
