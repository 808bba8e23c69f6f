//! Golden vectors for every frame type, checked in both directions (encode gives exactly these
//! bytes; decoding these bytes gives exactly this frame), plus properties of the decoder: it never
//! panics, round-trips what the encoder makes, and detects any single corrupted byte.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use slink::frame::{
    self, Accept, Ack, Auth, Challenge, ErrorCode, ErrorFrame, Frame, FrameError, Hello,
    FRAME_HEADER_BYTES, MAX_FRAME_PAYLOAD_BYTES,
};
use slink::{DeviceInfo, Entry, EntryKind, ResyncChunk, ResyncDone, SiteId};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn samples() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                version: 1,
                features: 1,
                group_uuid: [0x11; 16],
                epoch: 7,
                nonce: [0xAA; 32],
                sender_site: SiteId::new("paris").unwrap(),
                receiver_site: SiteId::new("lyon").unwrap(),
                devices: vec![
                    DeviceInfo {
                        device: 0,
                        size_bytes: 64 << 20,
                    },
                    DeviceInfo {
                        device: 1,
                        size_bytes: 32 << 20,
                    },
                ],
            }),
        ),
        (
            "challenge",
            Frame::Challenge(Challenge {
                features: 1,
                nonce: [0xBB; 32],
            }),
        ),
        ("auth", Frame::Auth(Auth { proof: [0xCC; 32] })),
        (
            "accept",
            Frame::Accept(Accept {
                epoch: 3,
                durable_lsn: 1000,
                durable_resync_seq: 5,
                features: 1,
                proof: [0xDD; 32],
            }),
        ),
        (
            "entries",
            Frame::Entries(vec![
                Entry {
                    lsn: 41,
                    device: 1,
                    offset: 4096,
                    kind: EntryKind::Write,
                    len: 4,
                    timestamp_ns: 1_700_000_000_000_000_000,
                    data: Bytes::from_static(b"abcd"),
                },
                Entry {
                    lsn: 42,
                    device: 0,
                    offset: 0,
                    kind: EntryKind::Zeroes,
                    len: 1 << 20,
                    timestamp_ns: 1,
                    data: Bytes::new(),
                },
                Entry {
                    lsn: 44,
                    device: 0,
                    offset: 8192,
                    kind: EntryKind::Discard,
                    len: 4096,
                    timestamp_ns: 2,
                    data: Bytes::new(),
                },
            ]),
        ),
        (
            "ack",
            Frame::Ack(Ack {
                durable_lsn: 44,
                resync_seq: 9,
            }),
        ),
        ("ping", Frame::Ping(0x0102030405060708)),
        ("pong", Frame::Pong(0x0102030405060708)),
        (
            "resync_data",
            Frame::ResyncData(ResyncChunk {
                seq: 10,
                device: 1,
                offset: 65536,
                data: Bytes::from_static(b"xyz"),
            }),
        ),
        (
            "resync_done",
            Frame::ResyncDone(ResyncDone { seq: 11, device: 1 }),
        ),
        (
            "error",
            Frame::Error(ErrorFrame::new(
                ErrorCode::NotAllowed,
                "no allow entry for site paris",
            )),
        ),
    ]
}

/// The checked-in bytes of each sample. Regenerate only with a protocol version bump.
const VECTORS: &[(&str, &str)] = &[
    (
        "hello",
        "534c4e4b 01000000 69000000 48c2eaf8 163b502f\
         0100010000000000000011111111111111111111111111111111070000000000\
         0000aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\
         aaaa057061726973046c796f6e02000000000000000000000400000000010000\
         000000000200000000",
    ),
    (
        "challenge",
        "534c4e4b 02000000 28000000 9c28bbda d8d6708c\
         0100000000000000bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\
         bbbbbbbbbbbbbbbb",
    ),
    (
        "auth",
        "534c4e4b 03000000 20000000 de785a55 d3c724e8\
         cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
    ),
    (
        "accept",
        "534c4e4b 04000000 40000000 85272552 835c59c8\
         0300000000000000e80300000000000005000000000000000100000000000000\
         dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
    ),
    (
        "entries",
        "534c4e4b 10000000 77000000 fbf56ad1 d4ea393a\
         0300000029000000000000000100000000100000000000000104000000000000\
         0000002a36fe9c9717616263642a000000000000000000000000000000000000\
         0002000010000000000001000000000000002c00000000000000000000000020\
         0000000000000300100000000000000200000000000000",
    ),
    (
        "ack",
        "534c4e4b 11000000 10000000 a531da2a b1752495\
         2c000000000000000900000000000000",
    ),
    (
        "ping",
        "534c4e4b 12000000 08000000 1c02f926 fe63fc3a\
         0807060504030201",
    ),
    (
        "pong",
        "534c4e4b 13000000 08000000 1c02f926 ceb78d0b\
         0807060504030201",
    ),
    (
        "resync_data",
        "534c4e4b 14000000 1b000000 f0495ed4 9674c598\
         0a000000000000000100000000000100000000000300000078797a",
    ),
    (
        "resync_done",
        "534c4e4b 15000000 0c000000 c4b4d52b 7f83dfb3\
         0b0000000000000001000000",
    ),
    (
        "error",
        "534c4e4b ff000000 21000000 66c3e0ed 8ac42507\
         03001d006e6f20616c6c6f7720656e74727920666f7220736974652070617269\
         73",
    ),
];

#[test]
fn golden_vectors_both_directions() {
    let mut bad = Vec::new();
    for (name, frame) in samples() {
        let want = VECTORS.iter().find(|(n, _)| *n == name).unwrap().1;
        let got = frame.to_bytes().unwrap();
        let want_hex: String = want.split_whitespace().collect();
        if hex(&got) != want_hex {
            bad.push(format!("(\"{name}\", \"{}\"),", hex(&got)));
            continue;
        }
        let mut buf = BytesMut::from(&unhex(want)[..]);
        let decoded = frame::decode(&mut buf, MAX_FRAME_PAYLOAD_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(decoded, frame, "{name}");
        assert!(buf.is_empty());
    }
    assert!(bad.is_empty(), "vectors differ:\n{}", bad.join("\n"));
}

/// One vector built from the spec text alone (PROTOCOL.md "Frame header"), not from the encoder.
#[test]
fn ping_vector_from_the_spec() {
    let payload = 0x0102030405060708u64.to_le_bytes();
    let mut head = Vec::new();
    head.extend_from_slice(b"SLNK");
    head.push(18); // Ping
    head.extend_from_slice(&[0, 0, 0]);
    head.extend_from_slice(&8u32.to_le_bytes());
    head.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    let head_crc = crc32c::crc32c(&head);
    head.extend_from_slice(&head_crc.to_le_bytes());
    head.extend_from_slice(&payload);
    assert_eq!(
        head,
        Frame::Ping(0x0102030405060708).to_bytes().unwrap().to_vec()
    );
    // crc32c itself: the standard check value.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn every_prefix_is_incomplete_and_every_byte_flip_is_caught() {
    for (name, frame) in samples() {
        let bytes = frame.to_bytes().unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(
                frame::check(&bytes[..cut], MAX_FRAME_PAYLOAD_BYTES),
                Err(FrameError::Incomplete),
                "{name} cut at {cut}"
            );
        }
        for at in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[at] ^= 0x40;
            let r = frame::check(&b, MAX_FRAME_PAYLOAD_BYTES);
            // A flip in the length field may make the frame look longer (Incomplete) or over the
            // limit, but never valid.
            assert!(r.is_err(), "{name}: flip at {at} not caught");
            if at >= FRAME_HEADER_BYTES {
                assert!(
                    matches!(r, Err(FrameError::PayloadCrc { .. })),
                    "{name}: flip at {at}: {r:?}"
                );
            } else if at >= 4 {
                assert!(
                    matches!(r, Err(FrameError::HeaderCrc { .. })),
                    "{name}: flip at {at}: {r:?}"
                );
            }
        }
    }
}

#[test]
fn limits_and_garbage() {
    // Garbage is refused from its first byte, without waiting for a header.
    assert!(matches!(
        frame::check(b"GET / HTTP/1.1\r\n", MAX_FRAME_PAYLOAD_BYTES),
        Err(FrameError::BadMagic(_))
    ));
    assert!(matches!(
        frame::check(b"X", 100),
        Err(FrameError::BadMagic(_))
    ));
    // A payload over the caller's limit is refused from the header alone.
    let big = Frame::ResyncData(ResyncChunk {
        seq: 1,
        device: 0,
        offset: 0,
        data: Bytes::from(vec![7u8; 100_000]),
    })
    .to_bytes()
    .unwrap();
    assert!(matches!(
        frame::check(&big[..FRAME_HEADER_BYTES], 65536),
        Err(FrameError::TooLarge { .. })
    ));
    // The encoder refuses frames it must not send.
    assert!(Frame::Entries(vec![]).to_bytes().is_err());
    let e = |lsn| Entry {
        lsn,
        device: 0,
        offset: 0,
        kind: EntryKind::Write,
        len: 1,
        timestamp_ns: 0,
        data: Bytes::from_static(b"x"),
    };
    assert!(Frame::Entries(vec![e(2), e(2)]).to_bytes().is_err());
    let mut wrong_len = e(1);
    wrong_len.len = 2;
    assert!(Frame::Entries(vec![wrong_len]).to_bytes().is_err());
    // Long error messages are cut to the limit at a char boundary.
    let long = ErrorFrame::new(ErrorCode::Other, "é".repeat(1000));
    assert!(long.message.len() <= frame::MAX_ERROR_MESSAGE_BYTES);
    let bytes = Frame::Error(long.clone()).to_bytes().unwrap();
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        frame::decode(&mut buf, MAX_FRAME_PAYLOAD_BYTES).unwrap(),
        Some(Frame::Error(long))
    );
}

/// Builds a frame with a valid header and crcs around an arbitrary payload, to reach the parser.
fn wrap(frame_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut head = Vec::new();
    head.extend_from_slice(b"SLNK");
    head.push(frame_type);
    head.extend_from_slice(&[0, 0, 0]);
    head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    head.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let c = crc32c::crc32c(&head);
    head.extend_from_slice(&c.to_le_bytes());
    head.extend_from_slice(payload);
    head
}

fn arb_entry() -> impl Strategy<Value = (u64, u32, u64, u8, u64, Vec<u8>)> {
    (
        1u64..1000,
        any::<u32>(),
        0u64..(1 << 40),
        1u8..=3,
        0u64..(1 << 30),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
}

proptest! {
    #[test]
    fn entries_round_trip(raw in proptest::collection::vec(arb_entry(), 1..20)) {
        let mut lsn = 0;
        let entries: Vec<Entry> = raw.into_iter().map(|(step, device, offset, kind, len, data)| {
            lsn += step;
            let kind = EntryKind::from_code(kind).unwrap();
            let (len, data) = if kind == EntryKind::Write {
                (data.len() as u64, Bytes::from(data))
            } else {
                (len, Bytes::new())
            };
            Entry { lsn, device, offset, kind, len, timestamp_ns: lsn * 3, data }
        }).collect();
        let f = Frame::Entries(entries);
        let bytes = f.to_bytes().unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        buf.extend_from_slice(b"SLN"); // the start of a next frame stays in the buffer
        prop_assert_eq!(frame::decode(&mut buf, MAX_FRAME_PAYLOAD_BYTES).unwrap(), Some(f));
        prop_assert_eq!(&buf[..], b"SLN");
    }

    #[test]
    fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = frame::decode(&mut buf, MAX_FRAME_PAYLOAD_BYTES);
    }

    #[test]
    fn parser_never_panics_on_any_payload(
        t in prop::sample::select(vec![1u8, 2, 3, 4, 16, 17, 18, 19, 20, 21, 255]),
        payload in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut buf = BytesMut::from(&wrap(t, &payload)[..]);
        match frame::decode(&mut buf, MAX_FRAME_PAYLOAD_BYTES) {
            Ok(Some(f)) => {
                // Whatever parsed must encode back to the same bytes (canonical encoding).
                prop_assert_eq!(f.to_bytes().unwrap().to_vec(), wrap(t, &payload));
            }
            Ok(None) => prop_assert!(false, "complete frame reported incomplete"),
            Err(FrameError::Malformed { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }
}
