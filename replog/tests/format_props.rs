//! Properties of the metadata slot bytes (format 2): encode/decode round-trips for any valid
//! field values; one flipped byte or a torn write (any mix of two slots' sectors) never decodes
//! as anything but one of the two slots.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use proptest::prelude::*;
use replog::format::{
    ActivityLogState, Binding, EpochStart, Identity, MetaSlot, Role, AL_EXTENTS_MAX,
    EPOCH_HISTORY_MAX, FEATURE_ACTIVITY_LOG,
};

fn identity() -> impl Strategy<Value = Identity> {
    let role = prop_oneof![
        Just(Role::Unset),
        Just(Role::Primary),
        Just(Role::Secondary)
    ];
    let epochs = proptest::collection::vec((1u64..1000, 0u64..1 << 40), 0..=EPOCH_HISTORY_MAX)
        .prop_map(|steps| {
            let (mut epoch, mut lsn) = (0u64, 0u64);
            steps
                .into_iter()
                .map(|(de, dl)| {
                    epoch += de;
                    lsn += dl;
                    EpochStart {
                        epoch,
                        start_lsn: lsn,
                    }
                })
                .collect()
        });
    // Up to 64 bytes of UTF-8: 16 chars of at most 4 bytes.
    let binding = proptest::option::of((any::<[u8; 16]>(), "\\PC{1,16}")).prop_map(|b| {
        b.map(|(peer_group_uuid, peer_site_id)| Binding {
            peer_group_uuid,
            peer_site_id,
        })
    });
    (role, epochs, binding).prop_map(|(role, epochs, binding)| Identity {
        role,
        epochs,
        binding,
    })
}

fn activity_log() -> impl Strategy<Value = ActivityLogState> {
    (12u32..=40).prop_flat_map(|shift| {
        let max_extent = u64::MAX >> shift;
        proptest::collection::btree_set((any::<u32>(), 0..=max_extent), 0..=AL_EXTENTS_MAX)
            .prop_map(move |set| ActivityLogState {
                extent_bytes: 1 << shift,
                extents: set.into_iter().collect(),
            })
    })
}

fn meta_slot() -> impl Strategy<Value = MetaSlot> {
    let v1_fields = (
        any::<[u8; 16]>(),
        any::<u64>(),
        (4u64..1 << 30).prop_map(|blocks| blocks * 4096),
        (1u32..u32::MAX, any::<u64>(), any::<u64>()),
        any::<u16>(),
        any::<[u64; 16]>(),
    );
    (
        v1_fields,
        any::<[u64; 16]>(),
        any::<bool>(),
        identity(),
        activity_log(),
        any::<[Option<u64>; 16]>(),
    )
        .prop_map(
            |(
                (
                    uuid,
                    sequence,
                    ring_bytes,
                    (generation, tail_vpos, tail_lsn),
                    registered,
                    cursors,
                ),
                resync_seqs,
                al_feature,
                identity,
                activity_log,
                drop_floors,
            )| MetaSlot {
                sequence,
                generation,
                tail_generation: generation / 2,
                tail_vpos: tail_vpos & !127,
                tail_lsn,
                head_hint_vpos: tail_vpos,
                registered,
                cursors,
                resync_seqs,
                features: if al_feature { FEATURE_ACTIVITY_LOG } else { 0 },
                identity,
                activity_log,
                drop_floors,
                ..MetaSlot::fresh(uuid, ring_bytes, sequence ^ 0x5555)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_valid_slot_round_trips(m in meta_slot()) {
        prop_assert_eq!(m.check(), Ok(()));
        prop_assert_eq!(m.check_geometry(), Ok(()));
        let bytes = m.encode();
        prop_assert_eq!(bytes.len(), 4096);
        prop_assert_eq!(MetaSlot::decode_versioned(&bytes), Ok((m.clone(), 3)));
        // Without drop floors, format 2 says the same (the upgrade tests build such images).
        let v2 = MetaSlot { drop_floors: [None; 16], ..m };
        prop_assert_eq!(MetaSlot::decode_versioned(&v2.encode_v2().unwrap()), Ok((v2, 2)));
    }

    #[test]
    fn one_flipped_byte_never_decodes(m in meta_slot(), at in 0usize..4096, x in 1u8..=255) {
        let mut bytes = m.encode();
        bytes[at] ^= x;
        prop_assert!(MetaSlot::decode(&bytes).is_err(), "byte {} ^ {:#x} still decodes", at, x);
    }

    /// A torn slot write: some 512-byte sectors of the new slot over the old one. It decodes as
    /// the old slot, the new slot (when the sectors that differ all came from one of them), or
    /// not at all; never as a mix.
    #[test]
    fn a_torn_slot_is_old_new_or_invalid(old in meta_slot(), new in meta_slot(), mask in 0u8..=255) {
        let (a, b) = (old.encode(), new.encode());
        let mut torn = a.clone();
        for sector in 0..8 {
            if mask & (1 << sector) != 0 {
                torn[sector * 512..(sector + 1) * 512].copy_from_slice(&b[sector * 512..(sector + 1) * 512]);
            }
        }
        match MetaSlot::decode(&torn) {
            Err(_) => {}
            Ok(m) => prop_assert!(
                (m == old && torn == a) || (m == new && torn == b),
                "a torn slot decoded as a mix (mask {:#x})", mask
            ),
        }
    }

    /// A slot only format 1 can express round-trips through the format-1 encoder, and a
    /// format-1 slot's defaults are the format-2 "nothing known" values.
    #[test]
    fn format_1_slots_decode_to_defaults(m in meta_slot()) {
        let v1 = MetaSlot {
            resync_seqs: [0; 16],
            features: 0,
            identity: Identity::default(),
            activity_log: ActivityLogState::default(),
            drop_floors: [None; 16],
            ..m
        };
        let bytes = v1.encode_v1().unwrap();
        prop_assert_eq!(MetaSlot::decode_versioned(&bytes), Ok((v1, 1)));
    }
}
