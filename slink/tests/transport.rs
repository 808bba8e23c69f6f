//! The TCP transport over real sockets on loopback: round trips, refusals, garbage, reconnect
//! with resend from the durable position, keepalive, and corruption (through the in-repo link
//! emulator, which these tests run in-process).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use slink::frame::{self, ErrorCode, Frame};
use slink::linkemu::{LinkEmulator, LinkParams};
use slink::{LinkState, Permission, Psk, SlinkListener, SlinkSender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ANY: &str = "127.0.0.1:0";

fn listener_cfg() -> slink::SiteConfig {
    cfg("lyon", KEY).allow(site("paris"), Permission::ReadWrite)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_many_entries_with_acks() {
    say_link("direct loopback TCP");
    let sink = MemSink::new();
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), sink.clone()).unwrap();
    let source = MemSource::new();
    let n = 5000;
    source.publish_to(n / 2);
    let sender = SlinkSender::spawn(
        listener.local_addr().to_string(),
        cfg("paris", KEY),
        identity(),
        source.clone(),
    )
    .unwrap();
    let mut st = sender.status();
    wait_status(&mut st, 20, "first half acked", |s| s.acked.lsn == n / 2).await;
    source.publish_to(n);
    let s = wait_status(&mut st, 20, "all acked", |s| s.acked.lsn == n).await;
    assert_eq!(s.state, LinkState::Up);
    assert_eq!(s.peer_epoch, Some(9));
    sink.assert_exactly(n);
    let c = sender.counters();
    assert_eq!(c.entries, n);
    assert!(
        c.frames_sent < n / 4,
        "entries are batched: {} frames",
        c.frames_sent
    );
    assert_eq!(c.sessions, 1);
    let l = listener.counters();
    assert_eq!(
        (l.crc_errors, l.bad_frames, l.auth_failures, l.refusals),
        (0, 0, 0, 0)
    );
    assert_eq!(l.entries, n);
    sender.shutdown().await;
    listener.shutdown().await;
}

/// Starts a sender with `sender_cfg` toward a listener with `listener_cfg` and `sink`, waits for
/// its first failure and returns (sender's last error, listener counters).
async fn refused(
    sender_cfg: slink::SiteConfig,
    listener_cfg: slink::SiteConfig,
    sink: std::sync::Arc<MemSink>,
    ident: slink::LinkIdentity,
) -> (String, slink::CountersSnapshot, slink::CountersSnapshot) {
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg, sink).unwrap();
    let source = MemSource::new();
    source.publish_to(10);
    let sender =
        SlinkSender::spawn(listener.local_addr().to_string(), sender_cfg, ident, source).unwrap();
    let mut st = sender.status();
    let s = wait_status(&mut st, 10, "a refusal", |s| s.last_error.is_some()).await;
    assert_ne!(s.state, LinkState::Up);
    assert_eq!(s.acked.lsn, 0);
    let out = (
        s.last_error.unwrap(),
        sender.counters(),
        listener.counters(),
    );
    sender.shutdown().await;
    listener.shutdown().await;
    out
}

#[tokio::test]
async fn wrong_key_is_refused_and_both_sides_say_why() {
    say_link("direct loopback TCP");
    let (err, snd, lst) = refused(
        cfg("paris", b"another key entirely, 32 bytes!"),
        listener_cfg(),
        MemSink::new(),
        identity(),
    )
    .await;
    assert!(err.contains("AuthFailed"), "{err}");
    assert!(
        err.contains("authentication failed: site paris's key proof did not verify"),
        "{err}"
    );
    assert!(
        snd.auth_failures >= 1 && lst.auth_failures >= 1,
        "{snd:?} {lst:?}"
    );
}

#[tokio::test]
async fn an_impostor_receiver_fails_the_senders_check() {
    // The receiver holds another key but (wrongly) skips checking the sender: here simulated by
    // a listener with the other key; the listener refuses first, so build the impostor case from
    // the pure functions instead: a receiver proof made with another key never verifies.
    use slink::auth::{prove, verify, Role, Transcript};
    let mut t = Transcript::new();
    t.add(b"hello");
    let good = Psk::new(KEY.to_vec()).unwrap();
    let bad = Psk::new(b"impostor key 0123456789".to_vec()).unwrap();
    assert!(!verify(
        &good,
        Role::Receiver,
        &t.digest(),
        &prove(&bad, Role::Receiver, &t.digest())
    ));
}

#[tokio::test]
async fn no_allow_entry_is_refused() {
    say_link("direct loopback TCP");
    let listener_cfg = cfg("lyon", KEY).allow(site("rome"), Permission::ReadWrite);
    let (err, snd, lst) =
        refused(cfg("paris", KEY), listener_cfg, MemSink::new(), identity()).await;
    assert!(
        err.contains("NotAllowed") && err.contains("no allow entry for site paris"),
        "{err}"
    );
    assert!(snd.refusals >= 1 && lst.refusals >= 1);
    assert_eq!(
        lst.auth_failures, 0,
        "refused before any proof is exchanged"
    );
}

#[tokio::test]
async fn wrong_receiver_site_is_refused() {
    let mut ident = identity();
    ident.receiver_site = site("berlin");
    let (err, _, _) = refused(cfg("paris", KEY), listener_cfg(), MemSink::new(), ident).await;
    assert!(err.contains("this is site lyon, not site berlin"), "{err}");
}

#[tokio::test]
async fn group_uuid_mismatch_is_refused() {
    say_link("direct loopback TCP");
    let sink = MemSink::with(*b"another-group-02", devices());
    let (err, _, lst) = refused(cfg("paris", KEY), listener_cfg(), sink, identity()).await;
    assert!(
        err.contains("GroupMismatch") && err.contains("group uuid mismatch"),
        "{err}"
    );
    assert!(lst.refusals >= 1);
}

#[tokio::test]
async fn device_size_mismatch_is_refused() {
    say_link("direct loopback TCP");
    let mut theirs = devices();
    theirs[1].size_bytes = 32 << 20;
    let sink = MemSink::with(GROUP, devices());
    let mut ident = identity();
    ident.devices = theirs;
    let (err, _, _) = refused(cfg("paris", KEY), listener_cfg(), sink, ident).await;
    assert!(
        err.contains("device 1 size differs: 64 MiB here, 32 MiB there"),
        "{err}"
    );
}

#[tokio::test]
async fn read_only_peer_may_not_ship() {
    let listener_cfg = cfg("lyon", KEY).allow(site("paris"), Permission::ReadOnly);
    let (err, _, _) = refused(cfg("paris", KEY), listener_cfg, MemSink::new(), identity()).await;
    assert!(
        err.contains("ReadOnly") && err.contains("read-only"),
        "{err}"
    );
}

#[tokio::test]
async fn garbage_from_a_peer_is_refused_and_counted() {
    say_link("direct loopback TCP");
    let listener =
        SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), MemSink::new()).unwrap();
    let mut s = tokio::net::TcpStream::connect(listener.local_addr())
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let mut b = BytesMut::from(&buf[..]);
    let reply = frame::decode(&mut b, frame::MAX_FRAME_PAYLOAD_BYTES)
        .unwrap()
        .unwrap();
    let Frame::Error(e) = reply else {
        panic!("expected an Error frame, got {reply:?}")
    };
    assert_eq!(e.code, ErrorCode::Protocol);
    assert!(e.message.contains("bad frame magic"), "{}", e.message);
    let c = listener.counters();
    assert_eq!((c.bad_frames, c.refusals, c.sessions), (1, 1, 0));
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_receiver_restart_resends_from_durable_lsn() {
    say_link("direct loopback TCP");
    let sink = MemSink::new();
    // The receiver reports durable 50 entries behind what it stored: a crash loses that tail.
    sink.durable_lag.store(50, Ordering::Relaxed);
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), sink.clone()).unwrap();
    let addr = listener.local_addr();
    let source = MemSource::new();
    source.publish_to(1000);
    let sender = SlinkSender::spawn(
        addr.to_string(),
        cfg("paris", KEY),
        identity(),
        source.clone(),
    )
    .unwrap();
    let mut st = sender.status();
    wait_status(&mut st, 20, "950 acked", |s| s.acked.lsn == 950).await;
    assert_eq!(sink.stored_len(), 1000);
    assert!(
        st.borrow().in_flight_bytes > 0,
        "the undurable tail stays in flight"
    );

    listener.shutdown().await;
    sink.crash();
    assert_eq!(sink.stored_len(), 950);
    wait_status(&mut st, 10, "link down", |s| s.state != LinkState::Up).await;
    sink.durable_lag.store(0, Ordering::Relaxed);
    source.publish_to(2000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = SlinkListener::bind(addr, listener_cfg(), sink.clone()).unwrap();
    let s = wait_status(&mut st, 20, "all acked after restart", |s| {
        s.acked.lsn == 2000
    })
    .await;
    assert!(s.sessions >= 2);
    // Exactly 1..=2000 in order: the 50 lost entries were resent, nothing duplicated.
    sink.assert_exactly(2000);
    let c = sender.counters();
    assert!(c.reconnects >= 1, "{c:?}");
    assert!(c.entries >= 2050, "lost tail resent: {c:?}");
    sender.shutdown().await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_detects_a_silent_peer() {
    say_link("in-repo link emulator (slink::linkemu, in-process)");
    let sink = MemSink::new();
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), sink.clone()).unwrap();
    let emu = LinkEmulator::start(
        ANY.parse().unwrap(),
        listener.local_addr().to_string(),
        LinkParams {
            delay: Duration::from_millis(5),
            ..LinkParams::default()
        },
    )
    .await
    .unwrap();
    let source = MemSource::new();
    source.publish_to(100);
    let sender = SlinkSender::spawn(
        emu.local_addr().to_string(),
        cfg("paris", KEY),
        identity(),
        source.clone(),
    )
    .unwrap();
    let mut st = sender.status();
    wait_status(&mut st, 10, "100 acked", |s| s.acked.lsn == 100).await;

    assert_eq!(emu.apply("stall on"), "ok");
    let t0 = Instant::now();
    let s = wait_status(&mut st, 5, "dead peer detected", |s| {
        s.state != LinkState::Up
    })
    .await;
    let took = t0.elapsed();
    eprintln!(
        "dead peer detected after {took:?} (dead_peer_timeout 800 ms): {:?}",
        s.last_error
    );
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("silent"),
        "{s:?}"
    );
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert!(sender.counters().keepalive_timeouts >= 1);

    // The link heals: the sender reconnects and ships the rest.
    assert_eq!(emu.apply("heal"), "ok");
    source.publish_to(300);
    wait_status(&mut st, 15, "300 acked after heal", |s| s.acked.lsn == 300).await;
    sink.assert_exactly(300);
    sender.shutdown().await;
    listener.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frame_closes_is_counted_and_is_resent() {
    say_link("in-repo link emulator (slink::linkemu, in-process), corrupt 1 byte / 300000");
    let sink = MemSink::new();
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), sink.clone()).unwrap();
    let emu = LinkEmulator::start(
        ANY.parse().unwrap(),
        listener.local_addr().to_string(),
        LinkParams {
            corrupt_every_bytes: Some(300_000),
            ..LinkParams::default()
        },
    )
    .await
    .unwrap();
    let source = MemSource::new();
    let n = 400; // about 9 MB of entries
    source.publish_to(n);
    let sender = SlinkSender::spawn(
        emu.local_addr().to_string(),
        cfg("paris", KEY),
        identity(),
        source.clone(),
    )
    .unwrap();
    let mut st = sender.status();
    let t0 = Instant::now();
    while listener.counters().crc_errors == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no crc error seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(emu.apply("corrupt off"), "ok");
    let s = wait_status(&mut st, 20, "all acked", |s| s.acked.lsn == n).await;
    sink.assert_exactly(n);
    let l = listener.counters();
    assert!(l.crc_errors >= 1, "{l:?}");
    assert!(
        s.sessions >= 2,
        "the connection was closed and re-established: {s:?}"
    );
    assert!(emu.stats().corrupted >= 1);
    eprintln!(
        "crc errors {} sessions {} corrupted bytes {}",
        l.crc_errors,
        s.sessions,
        emu.stats().corrupted
    );
    sender.shutdown().await;
    listener.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_over_a_long_narrow_link() {
    say_link("in-repo link emulator (slink::linkemu, in-process): 25 ms one-way, 100 Mbit/s");
    let sink = MemSink::new();
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), sink.clone()).unwrap();
    let rate = 12_500_000u64;
    let emu = LinkEmulator::start(
        ANY.parse().unwrap(),
        listener.local_addr().to_string(),
        LinkParams {
            delay: Duration::from_millis(25),
            rate_bytes_per_sec: Some(rate),
            ..LinkParams::default()
        },
    )
    .await
    .unwrap();
    let source = MemSource::new();
    let n = 1000; // about 22 MB
    let bytes: u64 = (1..=n).map(|l| entry(l).wire_bytes() as u64).sum();
    let sender = SlinkSender::spawn(
        emu.local_addr().to_string(),
        cfg("paris", KEY),
        identity(),
        source.clone(),
    )
    .unwrap();
    let mut st = sender.status();
    wait_status(&mut st, 10, "up", |s| s.state == LinkState::Up).await;
    let t0 = Instant::now();
    source.publish_to(n);
    wait_status(&mut st, 30, "all acked", |s| s.acked.lsn == n).await;
    let secs = t0.elapsed().as_secs_f64();
    let pct = bytes as f64 / secs / rate as f64 * 100.0;
    eprintln!("shipped {bytes} bytes in {secs:.2} s over 50 ms RTT at 100 Mbit/s: {pct:.0}% of the link rate");
    sink.assert_exactly(n);
    assert!(pct > 60.0, "pipelining keeps the link busy: {pct:.0}%");
    sender.shutdown().await;
    listener.shutdown().await;
    emu.shutdown().await;
}

/// A source with a fixed script of items (entries interleaved with a resync).
struct Script(Vec<slink::Item>);

impl slink::EntrySource for Script {
    async fn next_items(
        &self,
        after: slink::Position,
        _max_bytes: usize,
    ) -> Result<Vec<slink::Item>, String> {
        let rest: Vec<_> = self
            .0
            .iter()
            .filter(|i| match i {
                slink::Item::Entry(e) => e.lsn > after.lsn,
                slink::Item::ResyncData(c) => c.seq > after.resync_seq,
                slink::Item::ResyncDone(d) => d.seq > after.resync_seq,
            })
            .cloned()
            .collect();
        if rest.is_empty() {
            std::future::pending::<()>().await;
        }
        Ok(rest)
    }
}

/// Records every item in arrival order.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<slink::Item>>);

impl slink::SiteSink for Recorder {
    async fn admit(&self, _: &slink::PeerHello) -> Result<slink::Admission, slink::Refusal> {
        Ok(slink::Admission {
            epoch: 1,
            durable: slink::Position::default(),
        })
    }
    async fn store(
        &self,
        _: &slink::PeerHello,
        items: Vec<slink::Item>,
    ) -> Result<slink::Position, String> {
        let mut v = self.0.lock().unwrap();
        v.extend(items);
        let mut p = slink::Position::default();
        for i in v.iter() {
            match i {
                slink::Item::Entry(e) => p.lsn = e.lsn,
                slink::Item::ResyncData(c) => p.resync_seq = c.seq,
                slink::Item::ResyncDone(d) => p.resync_seq = d.seq,
            }
        }
        Ok(p)
    }
}

#[tokio::test]
async fn resync_items_travel_in_order_with_entries_and_are_acked_by_seq() {
    say_link("direct loopback TCP");
    use slink::{Item, ResyncChunk, ResyncDone};
    let mut script = vec![Item::Entry(entry(1)), Item::Entry(entry(2))];
    for seq in 1..=3u64 {
        script.push(Item::ResyncData(ResyncChunk {
            seq,
            device: 1,
            offset: seq * 65536,
            data: bytes::Bytes::from(vec![seq as u8; 65536]),
        }));
    }
    script.push(Item::ResyncDone(ResyncDone { seq: 4, device: 1 }));
    script.push(Item::Entry(entry(3)));
    let sink = std::sync::Arc::new(Recorder::default());
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), sink.clone()).unwrap();
    let sender = SlinkSender::spawn(
        listener.local_addr().to_string(),
        cfg("paris", KEY),
        identity(),
        std::sync::Arc::new(Script(script.clone())),
    )
    .unwrap();
    let mut st = sender.status();
    let s = wait_status(&mut st, 10, "all acked", |s| {
        s.acked.lsn == 3 && s.acked.resync_seq == 4
    })
    .await;
    assert_eq!(s.in_flight_bytes, 0);
    assert_eq!(*sink.0.lock().unwrap(), script);
    sender.shutdown().await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_from_the_same_site_replaces_the_older_one() {
    say_link("direct loopback TCP");
    let sink = MemSink::new();
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), sink.clone()).unwrap();
    let source = MemSource::new();
    source.publish_to(100);
    let first = SlinkSender::spawn(
        listener.local_addr().to_string(),
        cfg("paris", KEY),
        identity(),
        source.clone(),
    )
    .unwrap();
    let mut st1 = first.status();
    wait_status(&mut st1, 10, "first acked", |s| s.acked.lsn == 100).await;
    // A second sender for the same site and group (a restarted primary whose old connection is
    // still half-open): it takes over, the first is told to close.
    let second = SlinkSender::spawn(
        listener.local_addr().to_string(),
        cfg("paris", KEY),
        identity(),
        source.clone(),
    )
    .unwrap();
    let mut st2 = second.status();
    wait_status(&mut st2, 10, "second up", |s| {
        s.state == LinkState::Up && s.acked.lsn == 100
    })
    .await;
    let s1 = wait_status(&mut st1, 10, "first closed", |s| s.state != LinkState::Up).await;
    assert!(s1
        .last_error
        .unwrap_or_default()
        .contains("replaced by a newer connection"));
    first.shutdown().await;
    source.publish_to(200);
    wait_status(&mut st2, 10, "second ships", |s| s.acked.lsn == 200).await;
    sink.assert_exactly(200);
    second.shutdown().await;
    listener.shutdown().await;
}

#[tokio::test]
async fn a_receiver_that_never_answers_times_out_the_handshake() {
    say_link("direct loopback TCP (a listener that accepts and stays silent)");
    let l = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let addr = l.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = l.accept().await.unwrap();
            held.push(s);
        }
    });
    let mut c = cfg("paris", KEY);
    c.handshake_timeout = Duration::from_millis(300);
    let sender = SlinkSender::spawn(addr.to_string(), c, identity(), MemSource::new()).unwrap();
    let mut st = sender.status();
    let s = wait_status(&mut st, 5, "handshake timeout", |s| s.last_error.is_some()).await;
    assert!(s.last_error.unwrap().contains("took over 300ms"));
    sender.shutdown().await;
}

/// Wraps [`MemSource`] and records what the sender calls: a pull only inside a session whose
/// `session_started` returned and that has not ended, acks only in the open session.
struct SessionSource {
    inner: std::sync::Arc<MemSource>,
    state: std::sync::Mutex<SessionLog>,
}

#[derive(Default)]
struct SessionLog {
    /// The session whose start returned and that has not ended.
    open: Option<u64>,
    /// Per session: the peer position, and the first pull's `after`.
    starts: Vec<(u64, slink::Position, Option<slink::Position>)>,
    ended: Vec<u64>,
    violations: Vec<String>,
}

impl slink::EntrySource for SessionSource {
    async fn next_items(
        &self,
        after: slink::Position,
        max_bytes: usize,
    ) -> Result<Vec<slink::Item>, String> {
        {
            let mut st = self.state.lock().unwrap();
            if st.open.is_none() {
                st.violations
                    .push(format!("pull after {after:?} outside a session"));
            }
            if let Some((_, _, first)) = st.starts.last_mut() {
                first.get_or_insert(after);
            }
        }
        self.inner.next_items(after, max_bytes).await
    }

    async fn session_started(&self, session: u64, peer: slink::Position) -> Result<(), String> {
        // Slow on purpose: a pull that does not wait for it would come first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut st = self.state.lock().unwrap();
        if st.open.is_some() {
            st.violations
                .push(format!("session {session} started inside another"));
        }
        st.open = Some(session);
        st.starts.push((session, peer, None));
        Ok(())
    }

    fn acked(&self, session: u64, _pos: slink::Position) {
        let mut st = self.state.lock().unwrap();
        if st.open != Some(session) {
            let open = st.open;
            st.violations
                .push(format!("ack of session {session} while {open:?} is open"));
        }
    }

    fn session_ended(&self, session: u64, _reason: &str) {
        let mut st = self.state.lock().unwrap();
        if st.open == Some(session) {
            st.open = None;
        }
        st.ended.push(session);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_pulled_from_only_after_its_start_hook_returned_and_until_it_ended() {
    say_link("direct loopback TCP");
    let sink = MemSink::new();
    sink.durable_lag.store(20, Ordering::Relaxed);
    let listener = SlinkListener::bind(ANY.parse().unwrap(), listener_cfg(), sink.clone()).unwrap();
    let addr = listener.local_addr();
    let inner = MemSource::new();
    inner.publish_to(500);
    let source = std::sync::Arc::new(SessionSource {
        inner: inner.clone(),
        state: Default::default(),
    });
    let sender = SlinkSender::spawn(
        addr.to_string(),
        cfg("paris", KEY),
        identity(),
        source.clone(),
    )
    .unwrap();
    let mut st = sender.status();
    wait_status(&mut st, 20, "480 acked", |s| s.acked.lsn == 480).await;
    listener.shutdown().await;
    sink.crash();
    wait_status(&mut st, 10, "link down", |s| s.state != LinkState::Up).await;
    sink.durable_lag.store(0, Ordering::Relaxed);
    inner.publish_to(800);
    let listener = SlinkListener::bind(addr, listener_cfg(), sink.clone()).unwrap();
    wait_status(&mut st, 20, "all acked", |s| s.acked.lsn == 800).await;
    sender.shutdown().await;
    listener.shutdown().await;
    sink.assert_exactly(800);
    let log = source.state.lock().unwrap();
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    assert!(log.starts.len() >= 2, "a second session");
    for (session, peer, first_pull) in &log.starts {
        assert!(
            log.ended.contains(session),
            "session {session} ended (the sender stopped)"
        );
        if let Some(after) = first_pull {
            assert_eq!(
                after, peer,
                "session {session} pulls from the peer's position"
            );
        }
    }
    // The second session starts where the crashed receiver's durable position left it.
    assert_eq!(log.starts[1].1.lsn, 480);
}
