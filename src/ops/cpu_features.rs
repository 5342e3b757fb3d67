//! Which CPU kernels this machine runs: the AVX2 + FMA paths (NF4 decoding, adapter deltas)
//! are taken when the CPU reports both, checked once. `LORAPLEX_NO_SIMD=1` turns them off, for
//! comparing against the portable paths. The AVX-512 VNNI integer kernels (GGUF weights) and
//! Intel AMX are checked the same way.

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

/// Whether the AVX-512 VNNI integer kernels (`vpdpbusd`) run here.
pub fn avx512_vnni() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if !avx2_fma() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether f16 → f32 conversion instructions (F16C) are there, next to AVX2.
pub fn f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_fma() && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f` on a thread of the global rayon pool and waits for it (inline when already there). A forward step issues many
/// parallel kernels; called from a thread outside the pool, each one is injected into the pool
/// and the caller sleeps until it is done (measured: a 8-row decode step 24-26 → 20-21 ms when
/// run inside the pool, where the calling worker takes part in every kernel).
pub fn on_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::join(f, || ()).0
}

/// Whether Intel AMX tiles run the integer kernels' wide calls (`quant::amx`): the CPU reports
/// AMX-TILE and AMX-INT8 and Linux grants the process the tile data state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); checked once. `LORAPLEX_NO_AMX=1`
/// turns it off.
pub fn amx_int8() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("LORAPLEX_NO_AMX").is_ok_and(|v| v == "1") || !avx512_vnni() {
            return false;
        }
        amx_granted()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_granted() -> bool {
    // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (3 << 24) != 3 << 24 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; failure is reported, not raised.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx_granted() -> bool {
    false
}

/// The kernels this CPU runs, in words (stated once at start-up).
pub fn describe() -> &'static str {
    if amx_int8() {
        "AVX-512 VNNI integer kernels with AMX tiles for prompts, AVX-512 f32 matmuls, AVX2 + FMA float kernels"
    } else if avx512_vnni() {
        "AVX-512 VNNI integer kernels, AVX-512 f32 matmuls, AVX2 + FMA float kernels"
    } else if f16c() {
        "AVX2 integer and float kernels"
    } else if avx2_fma() {
        "AVX2 + FMA float kernels, portable integer kernels (no F16C)"
    } else {
        "portable kernels (no AVX2 + FMA here, or LORAPLEX_NO_SIMD=1): slower"
    }
}

/// Whether the AVX-512 BF16 dot products (`vdpbf16ps`) run here.
pub fn avx512_bf16() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if !avx2_fma() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}
