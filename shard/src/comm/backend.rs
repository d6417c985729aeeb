//! Which collective backend a group uses (`--tp-comm` on `medley serve`, `--comm` on the shard),
//! and the NCCL unique id's text form (how the launcher hands it to every rank).
//!
//! | `--tp-comm` | world size 1 | world size > 1 |
//! |---|---|---|
//! | `auto` (default) | none | NCCL when every rank has a GPU of its own (`--device cuda[:N]`), shared memory otherwise (`cpu`, `cuda:N:shared`) |
//! | `shm` | none | shared memory (partial sums through host memory) |
//! | `nccl` | NCCL (a group of one: checks the set-up) | NCCL |
//!
//! NCCL needs a binary built with the `cuda` feature and a CUDA device; it refuses two ranks on
//! one GPU, so `nccl` with `cuda:N:shared` above one rank is refused at start-up.

use std::fmt;
use std::str::FromStr;

use crate::device::{CUDA_BUILT, DeviceSpec};

/// The `--tp-comm` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommKind {
    /// NCCL for ranks on GPUs of their own, shared memory otherwise.
    #[default]
    Auto,
    /// The shared-memory CPU backend.
    Shm,
    /// NCCL.
    Nccl,
}

impl FromStr for CommKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "shm" => Ok(Self::Shm),
            "nccl" => Ok(Self::Nccl),
            other => Err(format!(
                "unknown collective backend {other:?}: use auto, shm or nccl"
            )),
        }
    }
}

impl fmt::Display for CommKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Shm => "shm",
            Self::Nccl => "nccl",
        })
    }
}

/// The backend a group ends up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommBackend {
    /// World size 1 without NCCL: no collectives.
    Single,
    /// [`super::ShmComm`].
    Shm,
    /// NCCL (`super::nccl`, with the `cuda` feature).
    Nccl,
}

impl CommKind {
    /// The backend for `world` ranks on `device`, or why that combination cannot run.
    pub fn resolve(self, device: DeviceSpec, world: u32) -> Result<CommBackend, String> {
        let own_gpus = matches!(device, DeviceSpec::Cuda { .. });
        match self {
            Self::Auto if world <= 1 => Ok(CommBackend::Single),
            Self::Auto if own_gpus && CUDA_BUILT => Ok(CommBackend::Nccl),
            Self::Auto | Self::Shm if world <= 1 => Ok(CommBackend::Single),
            Self::Auto | Self::Shm => Ok(CommBackend::Shm),
            Self::Nccl if !CUDA_BUILT => Err(
                "--tp-comm nccl needs a binary built with the `cuda` feature (scripts/cuda/build.sh)"
                    .into(),
            ),
            Self::Nccl if device == DeviceSpec::Cpu => {
                Err("--tp-comm nccl needs --device cuda: NCCL runs between GPUs".into())
            }
            Self::Nccl if world > 1 && !own_gpus => Err(format!(
                "--tp-comm nccl cannot put {world} ranks on one GPU ({device}): NCCL refuses two \
                 ranks on the same device; use --tp-comm shm, or --device cuda with one GPU per rank"
            )),
            Self::Nccl => Ok(CommBackend::Nccl),
        }
    }
}

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

/// An NCCL unique id as lowercase hex (256 characters), the form `MEDLEY_NCCL_ID` carries.
pub fn nccl_id_to_hex(id: &[u8; NCCL_ID_BYTES]) -> String {
    hex::encode(id)
}

/// Parses [`nccl_id_to_hex`]'s form.
pub fn nccl_id_from_hex(text: &str) -> Result<[u8; NCCL_ID_BYTES], String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("NCCL id is not hex: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("NCCL id has {} bytes, expected {NCCL_ID_BYTES}", b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for k in [CommKind::Auto, CommKind::Shm, CommKind::Nccl] {
            assert_eq!(k.to_string().parse::<CommKind>(), Ok(k));
        }
        assert_eq!(" NCCL ".parse::<CommKind>(), Ok(CommKind::Nccl));
        assert!("mpi".parse::<CommKind>().is_err());
    }

    #[test]
    fn auto_picks_nccl_only_for_ranks_on_gpus_of_their_own() {
        let cpu = DeviceSpec::Cpu;
        let gpus = DeviceSpec::Cuda { first: 0 };
        let shared = DeviceSpec::CudaShared { ordinal: 0 };
        assert_eq!(CommKind::Auto.resolve(cpu, 1), Ok(CommBackend::Single));
        assert_eq!(CommKind::Auto.resolve(gpus, 1), Ok(CommBackend::Single));
        assert_eq!(CommKind::Auto.resolve(cpu, 2), Ok(CommBackend::Shm));
        assert_eq!(CommKind::Auto.resolve(shared, 2), Ok(CommBackend::Shm));
        let want = if CUDA_BUILT {
            CommBackend::Nccl
        } else {
            CommBackend::Shm
        };
        assert_eq!(CommKind::Auto.resolve(gpus, 2), Ok(want));
        assert_eq!(CommKind::Shm.resolve(gpus, 2), Ok(CommBackend::Shm));
        assert_eq!(CommKind::Shm.resolve(cpu, 1), Ok(CommBackend::Single));
    }

    #[test]
    fn nccl_is_refused_where_it_cannot_run() {
        let cpu = DeviceSpec::Cpu;
        let gpus = DeviceSpec::Cuda { first: 0 };
        let shared = DeviceSpec::CudaShared { ordinal: 0 };
        let err = CommKind::Nccl.resolve(cpu, 2).expect_err("cpu");
        if CUDA_BUILT {
            assert!(err.contains("--device cuda"), "{err}");
            let err = CommKind::Nccl.resolve(shared, 2).expect_err("shared");
            assert!(err.contains("same device"), "{err}");
            assert_eq!(CommKind::Nccl.resolve(shared, 1), Ok(CommBackend::Nccl));
            assert_eq!(CommKind::Nccl.resolve(gpus, 1), Ok(CommBackend::Nccl));
            assert_eq!(CommKind::Nccl.resolve(gpus, 4), Ok(CommBackend::Nccl));
        } else {
            assert!(err.contains("`cuda` feature"), "{err}");
            assert!(CommKind::Nccl.resolve(gpus, 2).is_err());
        }
    }

    #[test]
    fn nccl_ids_round_trip_as_hex() {
        let mut id = [0u8; NCCL_ID_BYTES];
        for (k, b) in id.iter_mut().enumerate() {
            *b = (k * 7 + 3) as u8;
        }
        let text = nccl_id_to_hex(&id);
        assert_eq!(text.len(), 2 * NCCL_ID_BYTES);
        assert_eq!(nccl_id_from_hex(&text), Ok(id));
        assert!(nccl_id_from_hex("abc").is_err());
        assert!(
            nccl_id_from_hex("00ff")
                .expect_err("short")
                .contains("2 bytes")
        );
    }
}
