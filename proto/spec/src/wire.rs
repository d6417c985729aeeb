//! The shard's form of an [`AdapterSpec`] (`medley.shard.v1.AdapterSpec`) and back. The router
//! sends merges in canonical form ([`MergeSpec::canonical`]); the shard decodes them with the
//! same rules as every other entry point ([`MergedAdapters::validate`]), so an invalid spec gets
//! the same message wherever it is refused.

use medley_proto::shard::v1 as pb;

use crate::adapter::{AdapterRef, AdapterSource, AdapterSpec};
use crate::error::SpecError;
use crate::merge::MergeSpec;
use crate::names::Semantics;
use crate::selector::{MergeLimits, MergedAdapters, check_id_shape};

/// The wire form of an adapter reference.
pub fn ref_to_proto(r: &AdapterRef) -> pb::AdapterRef {
    pb::AdapterRef {
        id: r.id.clone(),
        source: source_to_proto(r.source) as i32,
        revision: r.revision.clone(),
        api_token: r.api_token.clone(),
    }
}

fn source_to_proto(s: AdapterSource) -> pb::AdapterSource {
    match s {
        AdapterSource::Hub => pb::AdapterSource::Hub,
        AdapterSource::Local => pb::AdapterSource::Local,
        AdapterSource::S3 => pb::AdapterSource::S3,
    }
}

/// An adapter reference from the wire; its id must have the shape its source requires.
pub fn ref_from_proto(r: pb::AdapterRef) -> Result<AdapterRef, SpecError> {
    let source = match pb::AdapterSource::try_from(r.source) {
        Ok(pb::AdapterSource::Hub) => AdapterSource::Hub,
        Ok(pb::AdapterSource::Local) => AdapterSource::Local,
        Ok(pb::AdapterSource::S3) => AdapterSource::S3,
        Err(_) => {
            return Err(SpecError::UnknownSource(
                crate::adapter::UnknownAdapterSource(r.source.to_string()),
            ));
        }
    };
    if r.id.is_empty() {
        return Err(SpecError::EmptyId);
    }
    check_id_shape(source, &r.id)?;
    Ok(AdapterRef {
        id: r.id,
        source,
        revision: r.revision.filter(|s| !s.is_empty()),
        api_token: r.api_token.filter(|s| !s.is_empty()),
    })
}

/// The wire form of `spec` (`None` for the base model, which is never loaded into a slot).
/// Merges are sent in canonical form.
pub fn spec_to_proto(spec: &AdapterSpec) -> Option<pb::AdapterSpec> {
    use pb::adapter_spec::Kind;
    let kind = match spec {
        AdapterSpec::Base => return None,
        AdapterSpec::Single(r) => Kind::Single(ref_to_proto(r)),
        AdapterSpec::Merged(m) => Kind::Merged(merge_to_proto(&m.components, &m.merge)),
    };
    Some(pb::AdapterSpec { kind: Some(kind) })
}

fn merge_to_proto(components: &[AdapterRef], merge: &MergeSpec) -> pb::MergeParameters {
    let c = merge.canonical();
    pb::MergeParameters {
        components: components
            .iter()
            .zip(&c.weights)
            .map(|(r, w)| pb::MergeComponent {
                adapter: Some(ref_to_proto(r)),
                weight: *w,
            })
            .collect(),
        strategy: c.strategy.name().into(),
        density: c.density,
        majority_sign_method: c.sign_method.name().into(),
        seed: c.seed,
        svd_rank: c.svd_rank.map(|r| u32::try_from(r).unwrap_or(u32::MAX)),
        semantics: c.semantics.name().into(),
        svd_clamp: c.svd_clamp,
    }
}

/// An adapter spec from the wire, checked with the rules of every entry point (a merge is not
/// limited in its number of components here: that limit is the router's policy).
pub fn spec_from_proto(spec: Option<pb::AdapterSpec>) -> Result<AdapterSpec, SpecError> {
    match spec.and_then(|s| s.kind) {
        None => Err(SpecError::Incomplete("the adapter spec is empty")),
        Some(pb::adapter_spec::Kind::Single(r)) => Ok(AdapterSpec::Single(ref_from_proto(r)?)),
        Some(pb::adapter_spec::Kind::Merged(m)) => merge_from_proto(m),
    }
}

fn merge_from_proto(m: pb::MergeParameters) -> Result<AdapterSpec, SpecError> {
    let semantics = match m.semantics.trim() {
        "" => Semantics::default(),
        s => s.parse().map_err(|error| SpecError::UnknownName {
            field: "semantics",
            error,
        })?,
    };
    let mut refs = Vec::with_capacity(m.components.len());
    let mut ids = Vec::with_capacity(m.components.len());
    let mut weights = Vec::with_capacity(m.components.len());
    for c in m.components {
        let adapter = c
            .adapter
            .ok_or(SpecError::Incomplete("a merge component names no adapter"))?;
        ids.push(adapter.id.clone());
        weights.push(c.weight);
        refs.push(adapter);
    }
    let request = MergedAdapters {
        ids: Some(ids),
        weights: Some(weights),
        merge_strategy: Some(m.strategy),
        density: m.density,
        majority_sign_method: Some(m.majority_sign_method),
        seed: Some(m.seed),
        svd_rank: m.svd_rank,
        svd_clamp: m.svd_clamp,
    };
    let limits = MergeLimits {
        max_adapters: usize::MAX,
        semantics,
    };
    let mut refs = refs.into_iter();
    let merged = request.validate(limits, |_| match refs.next() {
        Some(r) => ref_from_proto(r),
        None => Err(SpecError::Incomplete("a merge component names no adapter")),
    })?;
    Ok(AdapterSpec::Merged(merged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::MergedAdapterSpec;
    use crate::names::{SignMethod, Strategy};

    fn hub(id: &str) -> AdapterRef {
        AdapterRef {
            id: id.into(),
            source: AdapterSource::Hub,
            revision: Some("v2".into()),
            api_token: Some("tok".into()),
        }
    }

    fn round_trip(spec: &AdapterSpec) -> AdapterSpec {
        spec_from_proto(spec_to_proto(spec)).expect("decodes")
    }

    #[test]
    fn every_field_crosses_the_wire() {
        let merge = MergeSpec::new(Strategy::DareTiesSvd, vec![2.0, -0.5])
            .with_density(0.3)
            .with_sign_method(SignMethod::Frequency)
            .with_svd_rank(12)
            .with_svd_clamp(0.99)
            .with_seed(77)
            .with_semantics(Semantics::Lorax);
        let spec = AdapterSpec::Merged(MergedAdapterSpec {
            components: vec![hub("org/a"), hub("org/b")],
            merge,
        });
        assert_eq!(round_trip(&spec), spec);
        assert_eq!(round_trip(&spec).key(), spec.key());
        let single = AdapterSpec::Single(hub("org/a"));
        assert_eq!(round_trip(&single), single);
        assert_eq!(spec_to_proto(&AdapterSpec::Base), None);
    }

    #[test]
    fn merges_travel_in_canonical_form() {
        // DARE at density 1 is plain linear; fields linear ignores are dropped.
        let spec = AdapterSpec::Merged(MergedAdapterSpec {
            components: vec![hub("org/a"), hub("org/b")],
            merge: MergeSpec::new(Strategy::DareLinear, vec![1.0, -0.0])
                .with_density(1.0)
                .with_seed(5),
        });
        let back = round_trip(&spec);
        let AdapterSpec::Merged(m) = &back else {
            panic!("merged")
        };
        assert_eq!(m.merge.strategy, Strategy::Linear);
        assert_eq!(m.merge.density, None);
        assert_eq!(back.key(), spec.key(), "same identity");
    }

    #[test]
    fn the_shard_refuses_what_the_router_refuses() {
        let bad = |f: fn(&mut pb::MergeParameters)| {
            let spec = AdapterSpec::Merged(MergedAdapterSpec {
                components: vec![hub("org/a"), hub("org/b")],
                merge: MergeSpec::new(Strategy::Ties, vec![1.0, 1.0]).with_density(0.5),
            });
            let mut p = spec_to_proto(&spec).expect("proto");
            let Some(pb::adapter_spec::Kind::Merged(m)) = p.kind.as_mut() else {
                panic!("merged")
            };
            f(m);
            spec_from_proto(Some(p)).expect_err("refused")
        };
        assert_eq!(bad(|m| m.density = Some(1.5)), SpecError::DensityRange(1.5));
        assert_eq!(
            bad(|m| m.density = None),
            SpecError::MissingDensity { strategy: "ties" }
        );
        assert_eq!(bad(|m| m.svd_rank = Some(0)), SpecError::SvdRank);
        assert_eq!(
            bad(|m| m.svd_clamp = Some(-1.0)),
            SpecError::SvdClampRange(-1.0)
        );
        assert!(matches!(
            bad(|m| m.strategy = "slerp".into()),
            SpecError::UnknownName {
                field: "merge_strategy",
                ..
            }
        ));
        assert_eq!(bad(|m| m.components.clear()), SpecError::EmptyMerge);
        assert!(matches!(
            bad(|m| m.components[0].weight = f32::NAN),
            SpecError::NonFiniteWeight { index: 0, .. }
        ));
        assert_eq!(
            bad(|m| m.components[1].adapter.as_mut().expect("ref").id = "../x".into()),
            SpecError::InvalidHubId("../x".into())
        );
        assert_eq!(
            spec_from_proto(None),
            Err(SpecError::Incomplete("the adapter spec is empty"))
        );
    }
}
