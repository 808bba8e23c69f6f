//! A group's persisted identity, with real daemons over real TCP: role and epoch history, the
//! binding of a secondary to its primary group, the resync sequence marks and the handshake's
//! epoch and feature bits all live in the replog and survive restarts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const DEV_MIB: u64 = 32;
const LAG_TIMEOUT: Duration = Duration::from_secs(120);

fn primary_table(mode: &str, link: &str) -> String {
    let size = if mode == "open" {
        String::new()
    } else {
        format!(" {}", 64 * 2048)
    };
    let n = if mode == "open" { 3 } else { 4 };
    format!(
        "0 {} replicator default {n} prep.img 0 {mode}{size} \
         local 2 0 async 2 0 pdev0.img - 0 \
         tcp 3 1 async {link} 2 0 dev0 disk 3 128 s1-dev0.dirty nosync\n",
        DEV_MIB * 2048
    )
}

fn secondary_table() -> String {
    format!(
        "0 {} replicator default 4 srep.img 0 create {} local 2 0 async 2 0 sdev0.img - 0\n",
        DEV_MIB * 2048,
        64 * 2048
    )
}

/// Both sites, the secondary holding one secondary device and the primary none yet.
fn sites() -> Sites {
    let sites = Sites::start(&[]);
    sites.s.ok(&[
        "create",
        "--secondary",
        "dev0",
        &sites.s.table_file("s0", &secondary_table()),
    ]);
    sites
}

fn create_primary(sites: &Sites) {
    sites.p.ok(&[
        "create",
        "dev0",
        &sites
            .p
            .table_file("p0", &primary_table("create", &sites.listen)),
    ]);
}

fn inspect(d: &Daemon, replog: &str) -> serde_json::Value {
    let out = d.ok(&[
        "replog",
        "inspect",
        "--json",
        d.path(replog).to_str().unwrap(),
    ]);
    serde_json::from_str(&out).unwrap()
}

fn wait_link_up(sites: &Sites) {
    sites.wait_link_up("dev0", Duration::from_secs(30));
}

/// The stored resync seq the secondary reported in its last admission log line.
fn last_reported_seq(s: &Daemon) -> u64 {
    let log = s.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("admitted primary of group"))
        .unwrap_or_else(|| panic!("no admission logged:\n{log}"));
    line.rsplit("resync seq ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no seq in `{line}`"))
}

#[test]
fn a_primarys_role_and_epoch_survive_a_restart() {
    let mut d = Daemon::start();
    d.create("dev0", &two_site_table(8, 16, "async", 0, "create"));
    let before = inspect(&d, "replog.img");
    assert_eq!(before["role"], "Primary", "{before:#}");
    assert_eq!(before["current_epoch"]["epoch"], 1, "{before:#}");
    assert_eq!(before["epochs"].as_array().unwrap().len(), 1);
    assert_eq!(d.status("dev0")["epoch"], 1);
    d.stop();
    // The state dir record says secondary now: the replog, which holds the role, wins.
    let state = d.path("state/devices");
    for e in std::fs::read_dir(&state).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let mut rec: serde_json::Value = serde_json::from_str(&text).unwrap();
        rec["secondary"] = serde_json::Value::Bool(true);
        std::fs::write(&p, rec.to_string()).unwrap();
    }
    d.spawn();
    let st = d.status("dev0");
    assert_eq!(st["role"], "primary", "{st:#}");
    assert_eq!(st["epoch"], 1, "{st:#}");
    assert!(
        d.log().contains("the replog wins"),
        "the mismatch is logged:\n{}",
        d.log()
    );
    let after = inspect(&d, "replog.img");
    assert_eq!(after["role"], "Primary");
    assert_eq!(
        after["epochs"], before["epochs"],
        "no epoch begun by a restart"
    );
    let text = d.ok(&["replog", "inspect", d.path("replog.img").to_str().unwrap()]);
    assert!(
        text.contains("role") && text.contains("\"Primary\"") && text.contains("current_epoch"),
        "{text}"
    );
}

#[test]
fn a_secondarys_binding_survives_a_restart_and_another_group_is_still_refused() {
    let mut sites = sites();
    create_primary(&sites);
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
    let puuid = inspect(&sites.p, "prep.img")["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let bound = inspect(&sites.s, "srep.img");
    assert_eq!(bound["role"], "Secondary");
    assert_eq!(bound["binding"]["peer_group_uuid"], puuid.as_str());
    assert_eq!(bound["binding"]["peer_site_id"], "siteA");
    assert!(!sites.s.path("srep.img.binding.json").exists());

    sites.s.stop();
    sites.s.spawn();
    let st = sites.s.status("dev0");
    assert_eq!(st["role"], "secondary");
    assert_eq!(st["binding"]["peer_group_uuid"], puuid.as_str(), "{st:#}");
    assert_eq!(st["binding"]["peer_site_id"], "siteA");
    wait_link_up(&sites);

    // A new primary group (new replog, new uuid) is refused by the restarted secondary.
    sites.p.ok(&["remove", "dev0"]);
    std::fs::remove_file(sites.p.path("prep.img")).unwrap();
    create_primary(&sites);
    let err = wait_for("a refusal", Duration::from_secs(20), || {
        let st = sites.p.status("dev0");
        let e = st["slinks"][1]["link"]["last_error"].as_str()?.to_string();
        e.contains("group uuid mismatch").then_some(e)
    });
    eprintln!("refused as expected: {err}");
    assert_ne!(sites.link_state("dev0"), "up");
    assert_eq!(
        inspect(&sites.s, "srep.img")["binding"]["peer_group_uuid"],
        puuid.as_str(),
        "the binding did not move"
    );
}

#[test]
fn an_older_builds_binding_file_is_adopted_once_and_removed() {
    let mut d = Daemon::start();
    d.ok(&[
        "create",
        "--secondary",
        "dev0",
        &d.table_file("s0", &secondary_table()),
    ]);
    assert!(inspect(&d, "srep.img")["binding"].is_null());
    d.stop();
    let uuid = "00112233445566778899aabbccddeeff";
    let side = d.path("srep.img.binding.json");
    std::fs::write(
        &side,
        format!("{{\"group_uuid\": \"{uuid}\", \"primary_site\": \"siteA\"}}"),
    )
    .unwrap();
    d.spawn();
    assert!(!side.exists(), "the side file is removed once adopted");
    let st = d.status("dev0");
    assert_eq!(st["binding"]["peer_group_uuid"], uuid, "{st:#}");
    assert_eq!(st["binding"]["peer_site_id"], "siteA");
    d.stop();
    d.spawn();
    assert_eq!(
        inspect(&d, "srep.img")["binding"]["peer_group_uuid"],
        uuid,
        "kept in the replog"
    );
    // A broken side file refuses the group rather than dropping the binding it may hold.
    d.stop();
    std::fs::write(&side, "not json").unwrap();
    d.spawn();
    assert!(
        !d.cli(&["status", "dev0"]).status.success(),
        "the group is not restored"
    );
    assert!(d.log().contains("fix or remove it"), "{}", d.log());
    assert!(side.exists(), "a broken side file is left for the operator");
}

fn resync_and_wait(sites: &Sites) {
    sites.p.ok(&["message", "dev0", "0", "resync", "1"]);
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
}

#[test]
fn a_restarted_primary_numbers_resync_pieces_above_its_persisted_mark() {
    let mut sites = sites();
    create_primary(&sites);
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
    resync_and_wait(&sites);
    let mark1 = inspect(&sites.p, "prep.img")["slinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slink"] == 1)
        .unwrap()["resync_seq"]
        .as_u64()
        .unwrap();
    assert!(mark1 > 4096, "a block is reserved ahead of use: {mark1}");

    // The primary dies in the middle of a resync, and the secondary restarts too, so that
    // nobody reports the seqs already used: only the primary's persisted mark knows them.
    sites.p.ok(&["message", "dev0", "0", "resync", "1"]);
    sites.p.kill9();
    sites.s.stop();
    sites.s.spawn();
    sites.p.spawn();
    wait_link_up(&sites);
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
    resync_and_wait(&sites);

    // The next admission reports the highest seq the secondary stored since its restart.
    sites.p.stop();
    sites.p.spawn();
    wait_link_up(&sites);
    let reported = last_reported_seq(&sites.s);
    assert!(
        reported > mark1,
        "seqs after the restart ({reported}) are above the mark before it ({mark1})"
    );
    let slog = sites.s.log();
    assert!(!slog.contains("not after"), "no seq went back:\n{slog}");
    assert!(
        !slog.to_lowercase().contains("protocol"),
        "no protocol violation:\n{slog}"
    );
    assert!(same_bytes(
        &sites.p.path("pdev0.img"),
        &sites.s.path("sdev0.img"),
        DEV_MIB << 20
    ));
}

/// A promote-like identity update, written into a stopped primary's replog by hand.
fn begin_epoch(replog: &Path, epoch: u64) {
    let (r, _) = replog::Replog::open(replog, &replog::OpenOptions::default()).unwrap();
    r.update_identity(&replog::IdentityUpdate {
        role: Some(replog::Role::Primary),
        begin_epoch: Some(replog::EpochStart {
            epoch,
            start_lsn: r.next_lsn(),
        }),
        binding: None,
    })
    .unwrap();
}

#[test]
fn the_handshake_carries_the_replogs_epoch() {
    let mut sites = sites();
    create_primary(&sites);
    wait_link_up(&sites);
    assert!(sites.s.log().contains("at epoch 1,"), "{}", sites.s.log());
    sites.p.stop();
    begin_epoch(&sites.p.path("prep.img"), 7);
    sites.p.spawn();
    assert_eq!(sites.p.status("dev0")["epoch"], 7);
    wait_link_up(&sites);
    wait_for(
        "the secondary to see epoch 7",
        Duration::from_secs(20),
        || {
            sites
                .s
                .log()
                .contains("at epoch 7,")
                .then_some(String::new())
        },
    );
    let ins = inspect(&sites.p, "prep.img");
    assert_eq!(ins["current_epoch"]["epoch"], 7);
    assert_eq!(ins["epochs"].as_array().unwrap().len(), 2);
}

/// An entry source with nothing to send.
struct Nothing;

impl slink::EntrySource for Nothing {
    async fn next_items(
        &self,
        _after: slink::Position,
        _max_bytes: usize,
    ) -> Result<Vec<slink::Item>, String> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(Vec::new())
    }
}

#[test]
fn a_sender_that_will_use_unknown_features_is_refused() {
    let sites = sites();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cfg = slink::SiteConfig::new(
        slink::SiteId::new("siteA").unwrap(),
        slink::Psk::new(SITE_KEY.as_bytes().to_vec()).unwrap(),
    );
    let ident = slink::LinkIdentity {
        receiver_site: slink::SiteId::new("siteB").unwrap(),
        group_uuid: *b"some-group-uuid!",
        epoch: 1,
        devices: vec![slink::DeviceInfo {
            device: 0,
            size_bytes: DEV_MIB << 20,
        }],
        features: slink::handshake::FEATURE_RESYNC | 1 << 9,
    };
    let err = rt.block_on(async {
        let _guard = rt.enter();
        let sender = slink::SlinkSender::spawn(
            sites.listen.clone(),
            cfg,
            ident,
            std::sync::Arc::new(Nothing),
        )
        .unwrap();
        let mut st = sender.status();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = st.borrow().last_error.clone() {
                drop(sender);
                return e;
            }
            let _ = tokio::time::timeout_at(deadline, st.changed()).await;
            assert!(tokio::time::Instant::now() < deadline, "no refusal");
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    assert!(
        err.contains("0x200") && err.contains("does not support"),
        "{err}"
    );
    assert!(
        inspect(&sites.s, "srep.img")["binding"].is_null(),
        "nothing was bound"
    );
}
