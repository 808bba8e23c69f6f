//! Raw-socket tests of the NBD server: what real clients never send (garbage, lies, protocol
//! violations), exact error values, pipelining bounds and the shutdown drain.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod nbd_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nbd_support::*;
use replicator::nbd::proto::{self, NbdErrno};
use replicator::nbd::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

const MIB: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    server: TestServer,
    disk_path: std::path::PathBuf,
}

/// A server with `disk` (4 MiB read-write) and `ro` (1 MiB read-only).
async fn fixture(cfg: ServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("disk.img");
    let mut exports = TestExports::default();
    exports.add("disk", FileExport::create(&disk_path, 4 * MIB));
    exports.add(
        "ro",
        FileExport::create(&dir.path().join("ro.img"), MIB).read_only(),
    );
    exports.default = Some("disk".into());
    let server = start_tcp(exports, cfg).await;
    Fixture {
        _dir: dir,
        server,
        disk_path,
    }
}

/// A client that can still do real work proves the server kept serving.
async fn assert_server_serves(server: &TestServer) {
    let mut c = RawClient::connect_go(server, "disk", true).await;
    c.send_request(proto::CMD_READ, 0, 77, 0, 4096).await;
    let r = c.read_reply(Some(4096)).await;
    assert_eq!((r.cookie, r.error, r.data.len()), (77, 0, 4096));
    c.send_request(proto::CMD_DISC, 0, 78, 0, 0).await;
    assert!(c.is_closed().await);
}

fn errno(e: NbdErrno) -> u32 {
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_magic_at_handshake_drops_only_that_connection() {
    let f = fixture(ServerConfig::default()).await;
    let mut c = RawClient::greet(&f.server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.s.write_all(b"GARBAGE!GARBAGE!GARBAGE!").await.unwrap();
    assert!(c.is_closed().await);

    // Unknown client flags: the spec says the server MUST drop the connection.
    let mut c = RawClient::greet(&f.server, 0x80).await;
    assert!(c.is_closed().await);

    assert_server_serves(&f.server).await;
    let s = f.server.stats.snapshot();
    assert_eq!(s.protocol_violations_total, 2);
    assert_eq!(s.handshakes_failed_total, 2);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_get_unsup_and_the_session_continues() {
    let f = fixture(ServerConfig::default()).await;
    let mut c = RawClient::greet(&f.server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    for (option, len) in [
        (99u32, 10usize),
        (proto::OPT_STARTTLS, 0),
        (proto::OPT_EXTENDED_HEADERS, 0),
    ] {
        let r = c.option(option, &vec![7u8; len]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].reply_type, proto::REP_ERR_UNSUP, "option {option}");
    }
    // An unknown option longer than what we read into memory is skipped, not buffered.
    let r = c.option(1234, &vec![1u8; 200 * 1024]).await;
    assert_eq!(r[0].reply_type, proto::REP_ERR_UNSUP);
    // A known option with an absurd length: skipped and refused as too big.
    let r = c.option(proto::OPT_GO, &vec![0u8; 100 * 1024]).await;
    assert_eq!(r[0].reply_type, proto::REP_ERR_TOO_BIG);
    // Malformed GO data and an unknown export are errors, not disconnects.
    let r = c.option(proto::OPT_GO, &[0, 0, 0, 9, b'x']).await;
    assert_eq!(r[0].reply_type, proto::REP_ERR_INVALID);
    let r = c
        .option(proto::OPT_GO, &proto::encode_info_request("nope", &[]))
        .await;
    assert_eq!(r[0].reply_type, proto::REP_ERR_UNKNOWN);
    // Data on options that take none.
    let r = c.option(proto::OPT_LIST, &[1]).await;
    assert_eq!(r[0].reply_type, proto::REP_ERR_INVALID);
    let r = c.option(proto::OPT_STRUCTURED_REPLY, &[1]).await;
    assert_eq!(r[0].reply_type, proto::REP_ERR_INVALID);
    // Meta contexts before structured replies.
    let r = c
        .option(
            proto::OPT_SET_META_CONTEXT,
            &proto::encode_meta_context_request("disk", &["base:allocation"]),
        )
        .await;
    assert_eq!(r[0].reply_type, proto::REP_ERR_INVALID);

    // Still negotiating: the session finishes normally and transmission works.
    let r = c
        .option(proto::OPT_GO, &proto::encode_info_request("disk", &[]))
        .await;
    assert_eq!(r.last().unwrap().reply_type, proto::REP_ACK);
    c.send_request(proto::CMD_READ, 0, 1, 0, 512).await;
    let r = c.read_reply(Some(512)).await;
    assert_eq!((r.cookie, r.error), (1, 0));
    assert_eq!(f.server.stats.snapshot().protocol_violations_total, 0);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_info_and_export_name() {
    let f = fixture(ServerConfig::default()).await;
    let mut c = RawClient::greet(&f.server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    let r = c.option(proto::OPT_LIST, &[]).await;
    let names: Vec<String> = r
        .iter()
        .filter(|x| x.reply_type == proto::REP_SERVER)
        .map(|x| String::from_utf8(x.data[4..].to_vec()).unwrap())
        .collect();
    assert_eq!(names, vec!["disk", "ro"]);
    assert_eq!(r.last().unwrap().reply_type, proto::REP_ACK);

    // INFO on the default export (empty name) with name, description and block size.
    let req = proto::encode_info_request(
        "",
        &[
            proto::INFO_NAME,
            proto::INFO_DESCRIPTION,
            proto::INFO_BLOCK_SIZE,
        ],
    );
    let r = c.option(proto::OPT_INFO, &req).await;
    assert_eq!(r.last().unwrap().reply_type, proto::REP_ACK);
    let infos: Vec<&Vec<u8>> = r
        .iter()
        .filter(|x| x.reply_type == proto::REP_INFO)
        .map(|x| &x.data)
        .collect();
    let find = |t: u16| {
        infos
            .iter()
            .find(|d| u16::from_be_bytes([d[0], d[1]]) == t)
            .unwrap_or_else(|| panic!("info {t} missing in {infos:?}"))
    };
    let export = find(proto::INFO_EXPORT);
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        4 * MIB
    );
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_eq!(flags, proto::transmission_flags(false, true, false));
    assert_eq!(&find(proto::INFO_NAME)[2..], b"disk");
    assert_eq!(&find(proto::INFO_DESCRIPTION)[2..], b"test file export");
    assert_eq!(
        &find(proto::INFO_BLOCK_SIZE)[2..],
        &[0, 0, 2, 0, 0, 0, 0x10, 0, 2, 0, 0, 0]
    );

    // Read-only export flags.
    let r = c
        .option(proto::OPT_INFO, &proto::encode_info_request("ro", &[]))
        .await;
    let export = &r
        .iter()
        .find(|x| x.reply_type == proto::REP_INFO)
        .unwrap()
        .data;
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);

    // Old-style entry into transmission: size, flags and the 124 zero bytes.
    c.send_option(proto::OPT_EXPORT_NAME, b"disk").await;
    let mut reply = [0u8; 134];
    c.s.read_exact(&mut reply).await.unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 4 * MIB);
    assert!(reply[10..].iter().all(|b| *b == 0));
    c.send_request(proto::CMD_FLUSH, 0, 5, 0, 0).await;
    assert_eq!(c.read_reply(None).await.error, 0);

    // EXPORT_NAME for an unknown export: the server must terminate the session.
    let mut c = RawClient::greet(&f.server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"missing").await;
    assert!(c.is_closed().await);

    // ABORT is acknowledged.
    let mut c = RawClient::greet(&f.server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    let r = c.option(proto::OPT_ABORT, &[]).await;
    assert_eq!(r[0].reply_type, proto::REP_ACK);
    assert!(c.is_closed().await);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_readonly_unknown_and_misaligned_requests() {
    let f = fixture(ServerConfig::default()).await;
    for structured in [false, true] {
        let mut c = RawClient::connect_go(&f.server, "disk", structured).await;
        let end = 4 * MIB;
        let cases: Vec<(u16, u16, u64, u32, NbdErrno)> = vec![
            (proto::CMD_READ, 0, end, 512, NbdErrno::Inval),
            (proto::CMD_READ, 0, end - 512, 1024, NbdErrno::Inval),
            (proto::CMD_READ, 0, u64::MAX - 511, 1024, NbdErrno::Inval),
            (proto::CMD_TRIM, 0, end, 4096, NbdErrno::Inval),
            (proto::CMD_WRITE_ZEROES, 0, end, 4096, NbdErrno::NoSpc),
            (proto::CMD_READ, 0, 100, 512, NbdErrno::Inval),
            (proto::CMD_READ, 0, 0, 100, NbdErrno::Inval),
            (42, 0, 0, 512, NbdErrno::Inval),
            (proto::CMD_CACHE, 0, 0, 512, NbdErrno::Inval),
            (proto::CMD_READ, 1 << 12, 0, 512, NbdErrno::Inval),
            (proto::CMD_BLOCK_STATUS, 0, 0, 512, NbdErrno::Inval),
        ];
        for (i, (cmd, flags, offset, len, want)) in cases.iter().enumerate() {
            c.send_request(*cmd, *flags, i as u64, *offset, *len).await;
            let read_len = (*cmd == proto::CMD_READ).then_some(*len);
            let r = c.read_reply(read_len).await;
            assert_eq!(r.cookie, i as u64);
            assert_eq!(
                r.error,
                errno(*want),
                "case {i}: cmd {cmd} off {offset} len {len}"
            );
            assert!(r.data.is_empty());
            if structured {
                assert_eq!(r.chunks, vec![proto::CHUNK_ERROR], "case {i}");
            }
        }
        // Writes beyond the end and misaligned writes carry a payload: it is consumed and the
        // stream stays in sync.
        for (i, (offset, len, want)) in [
            (end, 4096u32, NbdErrno::NoSpc),
            (end - 512, 1024, NbdErrno::NoSpc),
            (10, 512, NbdErrno::Inval),
            (0, 700, NbdErrno::Inval),
        ]
        .into_iter()
        .enumerate()
        {
            c.send_request(proto::CMD_WRITE, 0, 100 + i as u64, offset, len)
                .await;
            c.s.write_all(&vec![0xee; len as usize]).await.unwrap();
            let r = c.read_reply(None).await;
            assert_eq!((r.cookie, r.error), (100 + i as u64, errno(want)));
        }
        // Zero-length requests succeed without touching anything.
        c.send_request(proto::CMD_WRITE, 0, 200, 0, 0).await;
        assert_eq!(c.read_reply(None).await.error, 0);
        c.send_request(proto::CMD_READ, 0, 201, 0, 0).await;
        let r = c.read_reply(Some(0)).await;
        assert_eq!((r.cookie, r.error, r.data.len()), (201, 0, 0));
        // And the connection still does real work.
        c.send_request(proto::CMD_READ, 0, 202, 0, 4096).await;
        assert_eq!(c.read_reply(Some(4096)).await.error, 0);
    }
    assert!(
        f.disk_path.metadata().unwrap().len() == 4 * MIB,
        "nothing written past the end"
    );
    assert_eq!(
        read_file_at(&f.disk_path, 0, 1024),
        vec![0u8; 1024],
        "no stray writes"
    );

    // Read-only export.
    let mut c = RawClient::connect_go(&f.server, "ro", true).await;
    c.send_request(proto::CMD_WRITE, 0, 1, 0, 512).await;
    c.s.write_all(&[1u8; 512]).await.unwrap();
    assert_eq!(c.read_reply(None).await.error, errno(NbdErrno::Perm));
    c.send_request(proto::CMD_TRIM, 0, 2, 0, 512).await;
    assert_eq!(c.read_reply(None).await.error, errno(NbdErrno::Perm));
    c.send_request(proto::CMD_WRITE_ZEROES, 0, 3, 0, 512).await;
    assert_eq!(c.read_reply(None).await.error, errno(NbdErrno::Perm));
    c.send_request(proto::CMD_READ, 0, 4, 0, 512).await;
    assert_eq!(c.read_reply(Some(512)).await.error, 0);
    c.send_request(proto::CMD_FLUSH, 0, 5, 0, 0).await;
    assert_eq!(c.read_reply(None).await.error, 0);

    assert_eq!(f.server.stats.snapshot().protocol_violations_total, 0);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests() {
    // A 1 MiB maximum payload makes "oversized" cheap to test.
    let cfg = ServerConfig {
        max_payload: 1 << 20,
        ..Default::default()
    };
    let f = fixture(cfg).await;
    let mut c = RawClient::connect_go(&f.server, "disk", true).await;
    // Oversized read: EINVAL (the spec keeps EOVERFLOW for DF reads we never fragment).
    c.send_request(proto::CMD_READ, 0, 1, 0, 2 << 20).await;
    assert_eq!(
        c.read_reply(Some(2 << 20)).await.error,
        errno(NbdErrno::Inval)
    );
    c.send_request(proto::CMD_WRITE_ZEROES, 0, 2, 0, 2 << 20)
        .await;
    assert_eq!(c.read_reply(None).await.error, errno(NbdErrno::Inval));
    // Oversized write below 32 MiB: the payload is read and discarded, EINVAL, session lives.
    c.send_request(proto::CMD_WRITE, 0, 3, 0, 2 << 20).await;
    c.s.write_all(&vec![0xab; 2 << 20]).await.unwrap();
    assert_eq!(c.read_reply(None).await.error, errno(NbdErrno::Inval));
    assert_eq!(read_file_at(&f.disk_path, 0, 4096), vec![0u8; 4096]);
    // Trim is not bounded by the maximum payload.
    c.send_request(proto::CMD_TRIM, 0, 4, 0, 4 << 20).await;
    assert_eq!(c.read_reply(None).await.error, 0);
    c.send_request(proto::CMD_READ, 0, 5, 0, 1 << 20).await;
    assert_eq!(c.read_reply(Some(1 << 20)).await.error, 0);
    // A write claiming 1 GiB: treated as an attack, connection dropped, nothing allocated.
    c.send_request(proto::CMD_WRITE, 0, 6, 0, 1 << 30).await;
    assert!(c.is_closed().await);
    assert_server_serves(&f.server).await;
    assert_eq!(f.server.stats.snapshot().protocol_violations_total, 1);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_disconnects_in_transmission_hurt_only_that_client() {
    let f = fixture(ServerConfig::default()).await;
    // A well-behaved client stays connected throughout.
    let mut good = RawClient::connect_go(&f.server, "disk", true).await;

    // Bad request magic.
    let mut c = RawClient::connect_go(&f.server, "disk", false).await;
    c.s.write_all(&[0x55u8; 28]).await.unwrap();
    assert!(c.is_closed().await);

    // Disconnect in the middle of a write payload.
    let mut c = RawClient::connect_go(&f.server, "disk", false).await;
    c.send_request(proto::CMD_WRITE, 0, 1, 0, 1 << 20).await;
    c.s.write_all(&vec![0xcd; 100 * 1024]).await.unwrap();
    drop(c);
    // Disconnect in the middle of a request header.
    let mut c = RawClient::connect_go(&f.server, "disk", false).await;
    c.s.write_all(&[0x25, 0x60, 0x95]).await.unwrap();
    drop(c);
    // Disconnect in the middle of the handshake.
    let mut c = RawClient::greet(&f.server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.s.write_all(&proto::encode_option_header(proto::OPT_GO, 100))
        .await
        .unwrap();
    drop(c);

    tokio::time::sleep(Duration::from_millis(200)).await;
    good.send_request(proto::CMD_WRITE, 0, 9, 0, 4096).await;
    good.s.write_all(&pattern(1, 0, 4096)).await.unwrap();
    assert_eq!(good.read_reply(None).await.error, 0);
    good.send_request(proto::CMD_READ, 0, 10, 0, 4096).await;
    assert_eq!(good.read_reply(Some(4096)).await.data, pattern(1, 0, 4096));
    assert_eq!(
        read_file_at(&f.disk_path, 4096, 4096),
        vec![0u8; 4096],
        "partial write applied"
    );
    assert_server_serves(&f.server).await;
    // Connection tasks finish just after the client sees EOF.
    for _ in 0..100 {
        if f.server.stats.snapshot().connections_active == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = f.server.stats.snapshot();
    assert!(s.protocol_violations_total >= 2, "{s:?}");
    assert_eq!(
        s.connections_active, 1,
        "only the good client is left: {s:?}"
    );
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_reads_block_status_and_df() {
    let f = fixture(ServerConfig::default()).await;
    let mut c = RawClient::greet(&f.server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
    c.structured = true;
    let r = c
        .option(
            proto::OPT_LIST_META_CONTEXT,
            &proto::encode_meta_context_request("disk", &[]),
        )
        .await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].reply_type, proto::REP_META_CONTEXT);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    let r = c
        .option(
            proto::OPT_SET_META_CONTEXT,
            &proto::encode_meta_context_request(
                "disk",
                &["qemu:dirty-bitmap:x", "base:allocation"],
            ),
        )
        .await;
    assert_eq!(r.len(), 2);
    let id = u32::from_be_bytes(r[0].data[..4].try_into().unwrap());
    let r = c
        .option(proto::OPT_GO, &proto::encode_info_request("disk", &[]))
        .await;
    let export = &r
        .iter()
        .find(|x| x.reply_type == proto::REP_INFO)
        .unwrap()
        .data;
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_ne!(flags & proto::TFLAG_SEND_DF, 0);

    c.send_request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 1, 8192, 8192)
        .await;
    c.s.write_all(&pattern(3, 8192, 8192)).await.unwrap();
    assert_eq!(c.read_reply(None).await.chunks, vec![proto::CHUNK_NONE]);
    c.send_request(proto::CMD_READ, proto::CMD_FLAG_DF, 2, 8192, 8192)
        .await;
    let r = c.read_reply(Some(8192)).await;
    assert_eq!(r.chunks, vec![proto::CHUNK_OFFSET_DATA]);
    assert_eq!(r.data, pattern(3, 8192, 8192));

    c.send_request(proto::CMD_BLOCK_STATUS, 0, 3, 0, 1 << 20)
        .await;
    let r = c.read_reply(None).await;
    assert_eq!(r.chunks, vec![proto::CHUNK_BLOCK_STATUS]);
    let p = &r.payloads[0];
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), id);
    assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), 1 << 20);
    c.send_request(proto::CMD_BLOCK_STATUS, 0, 4, 4 * MIB - 512, 1024)
        .await;
    assert_eq!(c.read_reply(None).await.error, errno(NbdErrno::Inval));
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_complete_out_of_order_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let mut exports = TestExports::default();
    let disk = exports.add(
        "disk",
        FileExport::create(&dir.path().join("d.img"), 4 * MIB).gated(Arc::clone(&gate)),
    );
    let cfg = ServerConfig {
        max_inflight_requests: 4,
        ..Default::default()
    };
    let server = start_tcp(exports, cfg).await;
    let mut c = RawClient::connect_go(&server, "disk", true).await;

    // A write does not pass the gate: it completes while reads are blocked behind it. The read
    // arrives alone first (the server starts it in its reader task) and must not hold up the
    // requests that follow.
    c.send_request(proto::CMD_READ, 0, 1, 0, 4096).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send_request(proto::CMD_WRITE, 0, 2, 4096, 4096).await;
    c.s.write_all(&pattern(9, 4096, 4096)).await.unwrap();
    let r = c.read_reply(None).await;
    assert_eq!(
        (r.cookie, r.error),
        (2, 0),
        "write overtook the blocked read"
    );

    // 20 more reads: at most 4 requests may be in flight, so at most 4 reads enter the export.
    for i in 0..20u64 {
        c.send_request(proto::CMD_READ, 0, 100 + i, i * 4096, 4096)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(disk.reads_started.load(Ordering::SeqCst), 4);
    assert!(server.stats.snapshot().requests_inflight <= 4);
    gate.add_permits(1000);
    let mut cookies = Vec::new();
    for _ in 0..21 {
        let r = c.read_reply(Some(4096)).await;
        assert_eq!(r.error, 0);
        cookies.push(r.cookie);
    }
    cookies.sort();
    let mut want: Vec<u64> = (100..120).collect();
    want.insert(0, 1);
    assert_eq!(cookies, want);
    assert!(disk.reads_max.load(Ordering::SeqCst) <= 4);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let mut exports = TestExports::default();
    let disk = exports.add(
        "disk",
        FileExport::create(&dir.path().join("d.img"), 4 * MIB).gated(Arc::clone(&gate)),
    );
    let cfg = ServerConfig {
        max_inflight_requests: 1,
        ..Default::default()
    };
    let server = start_tcp(exports, cfg).await;
    let mut c = RawClient::connect_go(&server, "disk", true).await;
    // An idle client in negotiation is closed by the shutdown too.
    let mut idle = RawClient::greet(&server, proto::FLAG_C_FIXED_NEWSTYLE).await;

    // A: blocks in the export holding the only slot; B: read, waits for the slot;
    // C: still in the receive buffer when shutdown comes.
    let mut batch = Vec::new();
    for (cookie, offset) in [(1u64, 0u64), (2, 4096), (3, 8192)] {
        batch.extend_from_slice(&proto::encode_request(&proto::Request {
            flags: 0,
            command: proto::CMD_READ,
            cookie,
            offset,
            length: 4096,
        }));
    }
    c.s.write_all(&batch).await.unwrap();
    while disk.reads_started.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown.send(true).unwrap();
    assert!(idle.is_closed().await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !server.handle.is_finished(),
        "drain waits for in-flight requests"
    );
    gate.add_permits(100);

    let mut got = Vec::new();
    for _ in 0..3 {
        let r = c.read_reply(Some(4096)).await;
        got.push((r.cookie, r.error));
    }
    got.sort();
    assert_eq!(got, vec![(1, 0), (2, 0), (3, errno(NbdErrno::Shutdown))]);
    assert!(c.is_closed().await);
    tokio::time::timeout(Duration::from_secs(10), server.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_and_connection_limit() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        max_connections: 1,
        ..Default::default()
    };
    let f = fixture(cfg).await;
    let first = f.server.connect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The second connection waits in the backlog: no greeting while the first holds the slot.
    let mut second = f.server.connect().await;
    let mut g = [0u8; 18];
    assert!(
        tokio::time::timeout(Duration::from_millis(150), second.read_exact(&mut g))
            .await
            .is_err()
    );
    // The first never negotiates and is dropped by the timeout; then the second is served.
    tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut g))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(f.server.stats.snapshot().handshakes_failed_total, 1);
    drop(first);
    drop(second);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_bounded_and_cannot_block_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut exports = TestExports::default();
    exports.add(
        "disk",
        FileExport::create(&dir.path().join("d.img"), 8 * MIB),
    );
    let cfg = ServerConfig {
        max_inflight_requests: 32,
        max_inflight_bytes: 8 << 20,
        max_payload: 1 << 20,
        shutdown_drain_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let server = start_tcp(exports, cfg).await;
    let mut c = RawClient::connect_go(&server, "disk", true).await;
    // 256 reads of 1 MiB = 256 MiB of replies that the client never reads.
    let mut batch = Vec::new();
    for cookie in 0..256u64 {
        batch.extend_from_slice(&proto::encode_request(&proto::Request {
            flags: 0,
            command: proto::CMD_READ,
            cookie,
            offset: 0,
            length: 1 << 20,
        }));
    }
    c.s.write_all(&batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // In flight: at most 8 MiB of read data (8 requests holding data, plus the next one whose
    // header was read and which waits for byte budget), whatever the client asked for.
    let s = server.stats.snapshot();
    assert!(s.requests_inflight <= 9, "{s:?}");
    assert!(
        s.requests_read_total < 256,
        "the server stopped reading: {s:?}"
    );
    // Another client is unaffected.
    assert_server_serves(&server).await;
    // Shutdown completes although this client never reads its replies.
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(c);
}
