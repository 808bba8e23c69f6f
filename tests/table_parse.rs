//! Table parser acceptance: the seed's examples verbatim, every policy / fallbehind / dirty log
//! form, malformed tables with exact positions, and round-trip properties of the canonical text.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::subsequence;
use replicator::table::{
    parse, DeviceParams, DirtyLogParams, DirtyLogSync, Fallbehind, Policy, PolicyMode, ReplogMode,
    ReplogParams, SlinkParams, Table, Target, Transport, MAX_SECTORS, MAX_SLINKS,
};

const SEED_1: &str = include_str!("../deploy/tables/seed-1ld-1rd-async.table");
const SEED_2: &str = include_str!("../deploy/tables/seed-2nd-ld-rd-async.table");
const SEED_2_CORRECTED: &str =
    include_str!("../deploy/tables/seed-2nd-ld-rd-async.corrected.table");
const TABLE_MD: &str = include_str!("../src/table/TABLE.md");
const QUICK_LOCAL: &str = include_str!("../deploy/tables/quickstart-local.table");
const QUICK_LOCAL_DEV1: &str = include_str!("../deploy/tables/quickstart-local-dev1.table");
const QUICK_TCP: &str = include_str!("../deploy/tables/quickstart-tcp.table");

fn one(text: &str) -> Target {
    let table = parse(text, "test.table").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(table.targets.len(), 1);
    table.targets.into_iter().next().unwrap()
}

fn local(
    slink_nr: u8,
    mode: PolicyMode,
    fallbehind: Fallbehind,
    dev_nr: u32,
    path: &str,
    dirty_log: DirtyLogParams,
) -> SlinkParams {
    SlinkParams {
        transport: Transport::Local,
        slink_nr,
        policy: Policy {
            mode,
            fallbehind,
            down_wait: None,
        },
        device: DeviceParams {
            dev_nr,
            path: path.to_owned(),
        },
        dirty_log,
    }
}

fn ios(n: u64) -> Fallbehind {
    Fallbehind {
        ios: Some(n),
        ..Fallbehind::default()
    }
}

// ---------------------------------------------------------------- the seed, verbatim

#[test]
fn seed_example_1_is_accepted_verbatim() {
    // The file is the slide's text byte for byte (see deploy/tables/).
    assert!(SEED_1.starts_with(
        "0 209715200 replicator \\\ndefault 4 /dev/local_vg/replog_store 32 create 2097152 \\\n"
    ));
    let table = parse(SEED_1, "seed-1ld-1rd-async.table").unwrap();
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    let expected = Target {
        start_sectors: 0,
        length_sectors: 209_715_200,
        replog: ReplogParams {
            path: PathBuf::from("/dev/local_vg/replog_store"),
            dev_start_sectors: 32,
            mode: ReplogMode::Create,
            size_sectors: Some(2_097_152),
        },
        slinks: vec![
            // ios=0: no bound.
            local(
                0,
                PolicyMode::Async,
                Fallbehind::default(),
                0,
                "/dev/local_vg/lvol0",
                DirtyLogParams::None,
            ),
            local(
                1,
                PolicyMode::Async,
                ios(100),
                0,
                "/dev/remote_vg/lvol0",
                DirtyLogParams::Disk {
                    region_sectors: 32768,
                    path: PathBuf::from("/dev/local_vg/slink1_lvol0_dirty_log"),
                    sync: DirtyLogSync::ForceResync,
                },
            ),
        ],
    };
    assert_eq!(table.targets, vec![expected]);
    // 100 GiB device, 1 GiB replog at 16 KiB, 16 MiB regions.
    let t = &table.targets[0];
    assert_eq!(t.length_bytes(), 100 << 30);
    assert_eq!(t.replog.dev_start_bytes(), 16 << 10);
    assert_eq!(t.replog.size_bytes(), Some(1 << 30));
    assert_eq!(t.slinks[1].dirty_log.region_bytes(), Some(16 << 20));
    assert_eq!(t.dev_nr(), Some(0));
    assert_eq!(t.local_slink().unwrap().device.path, "/dev/local_vg/lvol0");
    assert_eq!(
        t.to_string(),
        "0 209715200 replicator default 4 /dev/local_vg/replog_store 32 create 2097152 \
         local 2 0 async 2 0 /dev/local_vg/lvol0 - 0 \
         local 3 1 async ios=100 2 0 /dev/remote_vg/lvol0 disk 3 32768 /dev/local_vg/slink1_lvol0_dirty_log sync"
    );
}

#[test]
fn seed_example_1_with_paths_pointing_at_files() {
    let text = SEED_1
        .replace("/dev/local_vg/", "./run/local_vg_")
        .replace("/dev/remote_vg/", "./run/remote_vg_");
    let t = one(&text);
    assert_eq!(t.replog.path, PathBuf::from("./run/local_vg_replog_store"));
    assert_eq!(t.slinks[1].device.path, "./run/remote_vg_lvol0");
}

fn seed_2_expected() -> Target {
    Target {
        start_sectors: 0,
        length_sectors: 209_715_200,
        replog: ReplogParams {
            path: PathBuf::from("/dev/local_vg/replog_store"),
            dev_start_sectors: 32,
            mode: ReplogMode::Open,
            size_sectors: None,
        },
        slinks: vec![
            local(
                0,
                PolicyMode::Async,
                Fallbehind::default(),
                1,
                "/dev/local_vg/lvol1",
                DirtyLogParams::None,
            ),
            local(
                1,
                PolicyMode::Async,
                ios(100),
                1,
                "/dev/remote_vg/lvol1",
                DirtyLogParams::Disk {
                    region_sectors: 16384,
                    path: PathBuf::from("/dev/local_vg/slink1_lvol1_dirty_log"),
                    sync: DirtyLogSync::ForceResync,
                },
            ),
        ],
    }
}

#[test]
fn seed_example_2_is_accepted_verbatim_with_warnings() {
    // The slide's text with its artifacts: `\local`, `- 0` without a backslash, a lone `\` line,
    // and a replog count of 4 for `open` without a size.
    assert!(SEED_2.contains(
        "open \\\n\\local 2 0 async ios=0 \\\n2 1 /dev/local_vg/lvol1 \\\n- 0\n\\\nlocal 2 1"
    ));
    let table = parse(SEED_2, "seed-2nd-ld-rd-async.table").unwrap();
    assert_eq!(table.targets, vec![seed_2_expected()]);
    let warnings: Vec<String> = table.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with("seed-2nd-ld-rd-async.table:2:9: warning: replog count 4"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with("seed-2nd-ld-rd-async.table:3:1: warning: `\\l`"),
        "{warnings:?}"
    );
}

#[test]
fn seed_example_2_corrected_text_has_no_warnings() {
    let table = parse(SEED_2_CORRECTED, "t").unwrap();
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    assert_eq!(table.targets, vec![seed_2_expected()]);
}

/// TABLE.md's examples are checked, so the document cannot drift from the parser: `table`
/// blocks parse without warnings, `table-warnings` blocks with some, `table-error` blocks fail
/// with exactly the message on their `=>` line. The seed texts in it are the deploy files.
#[test]
fn table_md_examples_are_true() {
    let (mut valid, mut warned, mut refused) = (0, 0, 0);
    let mut lines = TABLE_MD.lines();
    while let Some(line) = lines.next() {
        let Some(kind) = line.strip_prefix("```") else {
            continue;
        };
        let kind = kind.trim().to_owned();
        let block: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        match kind.as_str() {
            "table" | "table-warnings" => {
                let text = block.join("\n");
                let table = parse(&text, "example.table").unwrap_or_else(|e| panic!("{e}\n{text}"));
                if kind == "table" {
                    assert!(table.warnings.is_empty(), "{:?}\n{text}", table.warnings);
                    valid += 1;
                } else {
                    assert!(!table.warnings.is_empty(), "{text}");
                    warned += 1;
                }
            }
            "table-error" => {
                let (expected, table_lines) = block.split_last().unwrap();
                let expected = expected.strip_prefix("=> ").unwrap();
                let text = table_lines.join("\n");
                let err = parse(&text, "example.table").expect_err(&text);
                assert_eq!(err.to_string(), expected, "\n{text}");
                refused += 1;
            }
            _ => {}
        }
    }
    assert!(
        valid >= 6 && warned == 1 && refused >= 15,
        "{valid} {warned} {refused}"
    );
    for file in [SEED_1, SEED_2, SEED_2_CORRECTED] {
        assert!(
            TABLE_MD.contains(file.trim_end()),
            "TABLE.md shows the deploy file verbatim:\n{file}"
        );
    }
}

#[test]
fn seed_syntax_slide_layout_with_lone_backslash_line() {
    // Syntax slide (1): a line holding only `\` separates the replog from the slinks.
    let t = one("0 8 replicator \\\ndefault 3 r 0 open \\\n\\\nlocal 2 0 sync \\\n2 0 d \\\n- 0\n");
    assert_eq!(t.slinks.len(), 1);
}

// ---------------------------------------------------------------- shipped examples

#[test]
fn quickstart_tables_parse() {
    let t = one(QUICK_LOCAL);
    assert_eq!(t.length_bytes(), 64 << 20);
    assert_eq!(t.replog.path, PathBuf::from("./run/replog.img"));
    assert_eq!(t.replog.mode, ReplogMode::Auto);
    assert_eq!(t.replog.size_bytes(), Some(64 << 20));
    assert_eq!(t.slinks[0].device.path, "./run/primary0.img");
    assert_eq!(t.slinks[1].device.path, "./run/secondary0.img");
    assert_eq!(
        t.slinks[1].policy.fallbehind,
        Fallbehind {
            ios: Some(1024),
            bytes: Some(16 << 20),
            timeout: Some(Duration::from_secs(5))
        }
    );
    assert_eq!(
        t.slinks[1].dirty_log,
        DirtyLogParams::Disk {
            region_sectors: 128,
            path: PathBuf::from("./run/slink1_dev0.dirty"),
            sync: DirtyLogSync::ForceResync
        }
    );

    let dev1 = one(QUICK_LOCAL_DEV1);
    assert_eq!(dev1.replog.path, t.replog.path, "same replog: same group");
    assert_eq!(dev1.replog.mode, ReplogMode::Open);
    assert_eq!(dev1.dev_nr(), Some(1));

    let tcp = one(QUICK_TCP);
    assert_eq!(
        tcp.slinks[1].transport,
        Transport::Tcp {
            addr: "127.0.0.1:7410".to_owned()
        }
    );
    assert_eq!(tcp.slinks[1].device.path, "dev0");
    assert_eq!(
        tcp.slinks[1].policy.fallbehind.timeout,
        Some(Duration::from_secs(30))
    );
    for (name, text) in [
        ("local", QUICK_LOCAL),
        ("dev1", QUICK_LOCAL_DEV1),
        ("tcp", QUICK_TCP),
    ] {
        assert!(parse(text, name).unwrap().warnings.is_empty(), "{name}");
    }
}

// ---------------------------------------------------------------- every form

/// A target whose slink 1 is `slink1` (text), with a core dirty log if `dirty` is empty.
fn with_slink1(slink1: &str) -> Target {
    one(&format!(
        "0 64 replicator default 4 r 0 create 64 local 2 0 async 2 0 d0 - 0 {slink1}"
    ))
}

#[test]
fn every_policy_form() {
    for (text, mode) in [
        ("sync", PolicyMode::Sync),
        ("synchronous", PolicyMode::Sync),
        ("async", PolicyMode::Async),
        ("asynchronous", PolicyMode::Async),
        ("stall", PolicyMode::Stall),
    ] {
        let t = with_slink1(&format!("local 2 1 {text} 2 0 d1 - 0"));
        assert_eq!(
            t.slinks[1].policy,
            Policy {
                mode,
                fallbehind: Fallbehind::default(),
                down_wait: None,
            },
            "{text}"
        );
    }
}

#[test]
fn every_fallbehind_form() {
    let cases: Vec<(&str, Fallbehind)> = vec![
        ("ios=100", ios(100)),
        ("ios=0", Fallbehind::default()),
        (
            "size=4096",
            Fallbehind {
                bytes: Some(4096),
                ..Fallbehind::default()
            },
        ),
        (
            "size=8k",
            Fallbehind {
                bytes: Some(8 << 10),
                ..Fallbehind::default()
            },
        ),
        (
            "size=8K",
            Fallbehind {
                bytes: Some(8 << 10),
                ..Fallbehind::default()
            },
        ),
        (
            "size=100m",
            Fallbehind {
                bytes: Some(100 << 20),
                ..Fallbehind::default()
            },
        ),
        (
            "size=2G",
            Fallbehind {
                bytes: Some(2 << 30),
                ..Fallbehind::default()
            },
        ),
        (
            "size=1t",
            Fallbehind {
                bytes: Some(1 << 40),
                ..Fallbehind::default()
            },
        ),
        ("size=0", Fallbehind::default()),
        (
            "timeout=250ms",
            Fallbehind {
                timeout: Some(Duration::from_millis(250)),
                ..Fallbehind::default()
            },
        ),
        (
            "timeout=30s",
            Fallbehind {
                timeout: Some(Duration::from_secs(30)),
                ..Fallbehind::default()
            },
        ),
        (
            "timeout=5m",
            Fallbehind {
                timeout: Some(Duration::from_secs(300)),
                ..Fallbehind::default()
            },
        ),
        (
            "timeout=1h",
            Fallbehind {
                timeout: Some(Duration::from_secs(3600)),
                ..Fallbehind::default()
            },
        ),
        ("timeout=0", Fallbehind::default()),
        (
            "ios=10 size=1m timeout=2s",
            Fallbehind {
                ios: Some(10),
                bytes: Some(1 << 20),
                timeout: Some(Duration::from_secs(2)),
            },
        ),
        (
            "timeout=2s ios=10",
            Fallbehind {
                ios: Some(10),
                bytes: None,
                timeout: Some(Duration::from_secs(2)),
            },
        ),
    ];
    for (fallbehind, expected) in cases {
        let k = fallbehind.split(' ').count();
        for mode in ["async", "stall"] {
            // The count may leave the fallbehind tokens out (the seed) or count them.
            for count in [2, 2 + k] {
                let t = with_slink1(&format!("local {count} 1 {mode} {fallbehind} 2 0 d1 - 0"));
                assert_eq!(
                    t.slinks[1].policy.fallbehind, expected,
                    "{mode} {count} {fallbehind}"
                );
            }
            for count in [3, 3 + k] {
                let t = with_slink1(&format!(
                    "tcp {count} 1 {mode} {fallbehind} site-b:7410 2 0 dev1 - 0"
                ));
                assert_eq!(
                    t.slinks[1].policy.fallbehind, expected,
                    "tcp {mode} {count} {fallbehind}"
                );
            }
        }
    }
}

#[test]
fn every_dirty_log_form() {
    let p = || PathBuf::from("/var/lib/dl");
    for (text, expected) in [
        ("- 0", DirtyLogParams::None),
        (
            "core 1 8",
            DirtyLogParams::Core {
                region_sectors: 8,
                sync: DirtyLogSync::Default,
            },
        ),
        (
            "core 2 1024 sync",
            DirtyLogParams::Core {
                region_sectors: 1024,
                sync: DirtyLogSync::ForceResync,
            },
        ),
        (
            "core 2 1024 nosync",
            DirtyLogParams::Core {
                region_sectors: 1024,
                sync: DirtyLogSync::AssumeInSync,
            },
        ),
        (
            "disk 2 32768 /var/lib/dl",
            DirtyLogParams::Disk {
                region_sectors: 32768,
                path: p(),
                sync: DirtyLogSync::Default,
            },
        ),
        (
            "disk 3 64 /var/lib/dl sync",
            DirtyLogParams::Disk {
                region_sectors: 64,
                path: p(),
                sync: DirtyLogSync::ForceResync,
            },
        ),
        (
            "disk 3 64 /var/lib/dl nosync",
            DirtyLogParams::Disk {
                region_sectors: 64,
                path: p(),
                sync: DirtyLogSync::AssumeInSync,
            },
        ),
    ] {
        let t = with_slink1(&format!("local 2 1 async 2 0 d1 {text}"));
        assert_eq!(t.slinks[1].dirty_log, expected, "{text}");
        assert_eq!(
            t.slinks[1].dirty_log.to_string(),
            text,
            "canonical spelling"
        );
    }
}

#[test]
fn dirty_log_sync_helpers_follow_dm_log() {
    // A log created now: dirty unless `nosync`. An existing disk log: kept unless a flag says.
    assert!(DirtyLogSync::Default.new_regions_dirty());
    assert!(DirtyLogSync::ForceResync.new_regions_dirty());
    assert!(!DirtyLogSync::AssumeInSync.new_regions_dirty());
    assert_eq!(DirtyLogSync::Default.overwrite_existing(), None);
    assert_eq!(DirtyLogSync::ForceResync.overwrite_existing(), Some(true));
    assert_eq!(DirtyLogSync::AssumeInSync.overwrite_existing(), Some(false));
}

#[test]
fn every_replog_form() {
    let slink = "local 2 0 sync 2 0 d - 0";
    for (text, mode, size) in [
        ("default 2 r 0", ReplogMode::Open, None),
        ("default 3 r 0 open", ReplogMode::Open, None),
        ("default 4 r 0 open 2048", ReplogMode::Open, Some(2048)),
        ("default 4 r 0 create 2048", ReplogMode::Create, Some(2048)),
        ("default 4 r 0 auto 2048", ReplogMode::Auto, Some(2048)),
        ("replog 4 r 0 auto 2048", ReplogMode::Auto, Some(2048)),
    ] {
        let t = one(&format!("0 8 replicator {text} {slink}"));
        assert_eq!(
            (t.replog.mode, t.replog.size_sectors),
            (mode, size),
            "{text}"
        );
    }
}

#[test]
fn tcp_slink_forms() {
    for addr in [
        "site-b:7410",
        "10.0.0.2:1",
        "[::1]:65535",
        "[fe80::1%eth0]:7410",
    ] {
        let t = with_slink1(&format!("tcp 3 1 async {addr} 2 0 remote-dev core 1 64"));
        assert_eq!(
            t.slinks[1].transport,
            Transport::Tcp {
                addr: addr.to_owned()
            }
        );
        assert_eq!(t.slinks[1].device.path, "remote-dev");
    }
}

#[test]
fn layout_comments_quotes_and_several_targets() {
    let text = "# two targets, CRLF line ends, a path with a space\r\n\
                0 8 replicator default 4 r 0 create 64 local 2 0 async 2 0 my\\ disk - 0 # slink 0\r\n\
                \r\n\
                8 16 replicator default 3 r 0 open local 2 0 async 2 1 d1 - 0 tcp 3 2 sync h:1 2 1 x - 0\r\n";
    let table = parse(text, "t").unwrap();
    assert_eq!(table.targets.len(), 2);
    assert_eq!(table.targets[0].slinks[0].device.path, "my disk");
    assert_eq!(table.targets[1].start_sectors, 8);
    assert_eq!(table.targets[1].slinks[1].slink_nr, 2);
    assert_eq!(table.length_sectors(), 24);
    assert!(table.warnings.is_empty());
    // Canonical text quotes the space again and parses back.
    let canonical = table.to_string();
    assert!(canonical.contains("my\\ disk"));
    assert_eq!(parse(&canonical, "c").unwrap().targets, table.targets);
}

// ---------------------------------------------------------------- malformed tables

/// Lines of a valid two-slink table; each malformed case replaces one line.
const BASE: [&str; 8] = [
    "0 1024 replicator \\",
    "default 4 /r 0 create 2048 \\",
    "local 2 0 async ios=0 \\",
    "2 0 /d0 \\",
    "- 0 \\",
    "local 2 1 async ios=100 \\",
    "2 0 /d1 \\",
    "disk 3 32 /dl sync",
];

fn base_with(line: usize, text: &str) -> String {
    let mut lines = BASE.to_vec();
    lines[line - 1] = text;
    lines.join("\n")
}

/// Asserts the error's position, token and a phrase of its `expected`, and the Display format.
fn refused(text: &str, line: usize, col: usize, token: Option<&str>, phrase: &str) {
    let err = parse(text, "bad.table").expect_err(text);
    assert_eq!(
        (err.line, err.col, err.token.as_deref()),
        (line, col, token),
        "{err}\n{text}"
    );
    assert!(
        err.expected.contains(phrase),
        "expected {phrase:?} in: {err}"
    );
    let found = match token {
        Some(t) => format!("found `{t}`"),
        None => "found end of table".to_owned(),
    };
    assert_eq!(
        err.to_string(),
        format!("bad.table:{line}:{col}: expected {}, {found}", err.expected)
    );
}

#[test]
fn base_table_is_valid() {
    let t = one(&BASE.join("\n"));
    assert_eq!(t.slinks.len(), 2);
}

#[test]
fn malformed_counts() {
    refused(
        &base_with(2, "default 5 /r 0 create 2048 \\"),
        2,
        9,
        Some("5"),
        "replog parameter count between 2 and 4",
    );
    refused(
        &base_with(6, "local 4 1 async ios=100 \\"),
        6,
        7,
        Some("4"),
        "slink parameter count 2 (fallbehind not counted) or 3",
    );
    refused(
        &base_with(6, "local 3 1 async \\"),
        6,
        7,
        Some("3"),
        "slink parameter count 2",
    );
    refused(
        &base_with(4, "3 0 /d0 \\"),
        4,
        1,
        Some("3"),
        "device parameter count `2`",
    );
    refused(
        &base_with(5, "- 1 \\"),
        5,
        3,
        Some("1"),
        "dirty log parameter count `0` after `-`",
    );
    refused(
        &base_with(8, "disk 4 32 /dl sync"),
        8,
        6,
        Some("4"),
        "`disk` dirty log parameter count between 2 and 3",
    );
    refused(
        &base_with(8, "core 3 32 sync"),
        8,
        6,
        Some("3"),
        "`core` dirty log parameter count between 1 and 2",
    );
}

#[test]
fn malformed_types() {
    refused(
        &base_with(1, "0 1024 linear \\"),
        1,
        8,
        Some("linear"),
        "target type `replicator`",
    );
    refused(
        &base_with(2, "ring 4 /r 0 create 2048 \\"),
        2,
        1,
        Some("ring"),
        "replog type `default`",
    );
    refused(
        &base_with(6, "nbd 2 1 async ios=100 \\"),
        6,
        1,
        Some("nbd"),
        "slink type `local` or `tcp`",
    );
    refused(
        &base_with(8, "mirror 3 32 /dl sync"),
        8,
        1,
        Some("mirror"),
        "dirty log type `-`, `core` or `disk`",
    );
    refused(
        &base_with(6, "local 2 1 semisync \\"),
        6,
        11,
        Some("semisync"),
        "policy `sync`, `async` or `stall`",
    );
    refused(
        &base_with(2, "default 3 /r 0 make \\"),
        2,
        16,
        Some("make"),
        "replog mode `auto`, `create` or `open`",
    );
    refused(
        &base_with(8, "disk 3 32 /dl nosnyc"),
        8,
        15,
        Some("nosnyc"),
        "`sync` or `nosync`",
    );
}

#[test]
fn malformed_numbers() {
    refused(
        &base_with(1, "0 10x24 replicator \\"),
        1,
        3,
        Some("10x24"),
        "length in sectors (a decimal number)",
    );
    refused(
        &base_with(1, "0 99999999999999999999 replicator \\"),
        1,
        3,
        Some("99999999999999999999"),
        "length in sectors between 1 and 36028797018963967",
    );
    refused(
        &base_with(1, "0 0 replicator \\"),
        1,
        3,
        Some("0"),
        "length in sectors between 1",
    );
    refused(
        &base_with(1, "8 1024 replicator \\"),
        1,
        1,
        Some("8"),
        "start sector 0",
    );
    refused(
        &base_with(2, "default 4 /r 36028797018963960 create 100 \\"),
        2,
        39,
        Some("100"),
        "replog size in sectors between 1 and 7",
    );
    refused(
        &base_with(4, "2 4294967296 /d0 \\"),
        4,
        3,
        Some("4294967296"),
        "device number between 0 and 4294967295",
    );
    refused(
        &base_with(8, "disk 3 1000 /dl sync"),
        8,
        8,
        Some("1000"),
        "power of two, at least 8",
    );
    refused(
        &base_with(8, "disk 3 4 /dl sync"),
        8,
        8,
        Some("4"),
        "power of two, at least 8",
    );
    refused(
        &base_with(6, "local 2 16 async ios=100 \\"),
        6,
        9,
        Some("16"),
        "slink number between 0 and 15",
    );
}

#[test]
fn malformed_fallbehind() {
    refused(
        &base_with(6, "local 2 1 async iops=100 \\"),
        6,
        17,
        Some("iops=100"),
        "fallbehind `ios=N`",
    );
    refused(
        &base_with(6, "local 2 1 async size=10x \\"),
        6,
        17,
        Some("size=10x"),
        "suffix k, m, g or t",
    );
    refused(
        &base_with(6, "local 2 1 async size=10kb \\"),
        6,
        17,
        Some("size=10kb"),
        "suffix k, m, g or t",
    );
    refused(
        &base_with(6, "local 2 1 async timeout=30 \\"),
        6,
        17,
        Some("timeout=30"),
        "unit ms, s, m or h",
    );
    refused(
        &base_with(6, "local 2 1 async ios=-1 \\"),
        6,
        17,
        Some("ios=-1"),
        "`ios=N`",
    );
    refused(
        &base_with(6, "local 2 1 async ios=99999999999999999999 \\"),
        6,
        17,
        Some("ios=99999999999999999999"),
        "at most 18446744073709551615",
    );
    refused(
        &base_with(6, "local 3 1 async ios=1 ios=2 \\"),
        6,
        23,
        Some("ios=2"),
        "already given at 6:17",
    );
    refused(
        &base_with(6, "local 2 1 sync ios=100 \\"),
        6,
        16,
        Some("ios=100"),
        "no fallbehind threshold after `sync`",
    );
}

#[test]
fn malformed_rules_across_slinks() {
    refused(
        &base_with(6, "local 2 0 async ios=100 \\"),
        6,
        9,
        Some("0"),
        "not used before in this target (slink 0 is at 3:9)",
    );
    refused(
        &base_with(3, "local 2 1 async ios=0 \\"),
        3,
        9,
        Some("1"),
        "slink number 0",
    );
    refused(
        &base_with(3, "tcp 3 0 async ios=0 h:1 \\"),
        3,
        1,
        Some("tcp"),
        "`local` for slink 0",
    );
    refused(
        &base_with(7, "2 1 /d1 \\"),
        7,
        3,
        Some("1"),
        "device number 0 (as for slink 0 at 4:3",
    );
    refused(
        &base_with(6, "tcp 3 1 async ios=100 hostonly \\"),
        6,
        23,
        Some("hostonly"),
        "`host:port`",
    );
    refused(
        &base_with(6, "tcp 3 1 async ios=100 h:0 \\"),
        6,
        23,
        Some("h:0"),
        "port 1 to 65535",
    );
}

#[test]
fn malformed_structure() {
    // create without size
    refused(
        &base_with(2, "default 3 /r 0 create \\"),
        2,
        16,
        Some("create"),
        "`create` and `auto` need a size",
    );
    refused(
        &base_with(2, "default 3 /r 0 auto \\"),
        2,
        16,
        Some("auto"),
        "`create` and `auto` need a size",
    );
    // count 4 after create, but no size follows (only `open` gets the seed's leniency)
    refused(
        &base_with(2, "default 4 /r 0 create \\"),
        3,
        1,
        Some("local"),
        "replog size in sectors",
    );
    // trailing garbage after the last dirty log
    refused(
        &base_with(8, "disk 3 32 /dl sync extra"),
        8,
        20,
        Some("extra"),
        "or the start sector of the next target",
    );
    // missing tokens: the table ends inside the last dirty log / before it
    refused(
        &base_with(8, "disk 3 32 /dl"),
        8,
        14,
        None,
        "`sync` or `nosync`",
    );
    refused(
        &BASE[..7].join("\n").replace("/d1 \\", "/d1"),
        7,
        8,
        None,
        "dirty log type",
    );
    refused("0 1024 replicator", 1, 18, None, "replog type");
    // nothing but comments
    refused(
        "# nothing here\n\n",
        1,
        1,
        None,
        "a target `<start> <length> replicator ...`",
    );
    // a backslash that quotes nothing
    refused(
        &base_with(8, "disk 3 32 /dl sync \\"),
        8,
        20,
        Some("\\"),
        "a character after `\\`",
    );
    // a second target that leaves a gap
    let two = format!(
        "{}\n2000 8 replicator default 3 /r 0 open local 2 0 async 2 1 /e - 0",
        BASE.join("\n")
    );
    refused(&two, 9, 1, Some("2000"), "start sector 1024");
}

// ---------------------------------------------------------------- properties

fn path_text() -> impl Strategy<Value = String> {
    // Spaces, tabs, `#`, `\`, `=` and non-ASCII exercise quoting; a line break cannot be written.
    "[a-zA-Z0-9_./ \t#=\\\\é-]{1,16}"
}

fn fallbehind() -> impl Strategy<Value = Fallbehind> {
    (
        proptest::option::of(1..=u64::MAX),
        proptest::option::of(1..=u64::MAX),
        proptest::option::of((1..=u64::MAX).prop_map(Duration::from_millis)),
    )
        .prop_map(|(ios, bytes, timeout)| Fallbehind {
            ios,
            bytes,
            timeout,
        })
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy {
            mode: PolicyMode::Sync,
            fallbehind: Fallbehind::default(),
            down_wait: None,
        }),
        (
            prop_oneof![Just(PolicyMode::Async), Just(PolicyMode::Stall)],
            fallbehind()
        )
            .prop_map(|(mode, fallbehind)| Policy {
                mode,
                fallbehind,
                down_wait: None,
            }),
    ]
}

fn dirty_log() -> impl Strategy<Value = DirtyLogParams> {
    let sync = || {
        prop_oneof![
            Just(DirtyLogSync::Default),
            Just(DirtyLogSync::ForceResync),
            Just(DirtyLogSync::AssumeInSync)
        ]
    };
    let region = || (3u32..=54).prop_map(|shift| 1u64 << shift);
    prop_oneof![
        Just(DirtyLogParams::None),
        (region(), sync()).prop_map(|(region_sectors, sync)| DirtyLogParams::Core {
            region_sectors,
            sync
        }),
        (region(), path_text(), sync()).prop_map(|(region_sectors, path, sync)| {
            DirtyLogParams::Disk {
                region_sectors,
                path: PathBuf::from(path),
                sync,
            }
        }),
    ]
}

fn transport() -> impl Strategy<Value = Transport> {
    prop_oneof![
        Just(Transport::Local),
        ("[a-z][a-z0-9.-]{0,12}", 1u16..).prop_map(|(host, port)| Transport::Tcp {
            addr: format!("{host}:{port}")
        }),
        (any::<[u8; 4]>(), 1u16..).prop_map(|(ip, port)| Transport::Tcp {
            addr: format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3])
        }),
        (1u16..).prop_map(|port| Transport::Tcp {
            addr: format!("[::1]:{port}")
        }),
    ]
}

fn slinks() -> impl Strategy<Value = Vec<SlinkParams>> {
    let others: Vec<u8> = (1..MAX_SLINKS).collect();
    (any::<u32>(), subsequence(others, 0..=4).prop_shuffle())
        .prop_flat_map(|(dev_nr, nrs)| {
            let n = nrs.len() + 1;
            (
                Just(dev_nr),
                Just(nrs),
                proptest::collection::vec((transport(), policy(), path_text(), dirty_log()), n),
            )
        })
        .prop_map(|(dev_nr, nrs, parts)| {
            parts
                .into_iter()
                .enumerate()
                .map(|(i, (transport, policy, path, dirty_log))| {
                    let (slink_nr, transport) = match i.checked_sub(1) {
                        None => (0, Transport::Local),
                        Some(j) => (nrs[j], transport),
                    };
                    SlinkParams {
                        transport,
                        slink_nr,
                        policy,
                        device: DeviceParams { dev_nr, path },
                        dirty_log,
                    }
                })
                .collect()
        })
}

fn replog() -> impl Strategy<Value = ReplogParams> {
    let mode = prop_oneof![
        Just(ReplogMode::Auto),
        Just(ReplogMode::Create),
        Just(ReplogMode::Open)
    ];
    (
        path_text(),
        0..=MAX_SECTORS - 1,
        mode,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(path, dev_start, mode, raw, open_sized)| {
            let size = 1 + raw % (MAX_SECTORS - dev_start);
            let size_sectors = if mode == ReplogMode::Open && !open_sized {
                None
            } else {
                Some(size)
            };
            ReplogParams {
                path: PathBuf::from(path),
                dev_start_sectors: dev_start,
                mode,
                size_sectors,
            }
        })
}

fn target() -> impl Strategy<Value = Target> {
    (1..=MAX_SECTORS, replog(), slinks()).prop_map(|(length_sectors, replog, slinks)| Target {
        start_sectors: 0,
        length_sectors,
        replog,
        slinks,
    })
}

fn table() -> impl Strategy<Value = Table> {
    proptest::collection::vec((1u64..=1 << 40, target()), 1..=3).prop_map(|parts| {
        let mut start = 0;
        let targets = parts
            .into_iter()
            .map(|(length, mut t)| {
                t.start_sectors = start;
                t.length_sectors = length;
                start += length;
                t
            })
            .collect();
        Table {
            targets,
            warnings: Vec::new(),
        }
    })
}

/// Token-level mutations of a valid table's text.
fn mutate(text: &str, op: u8, at: usize, with: &str) -> String {
    let mut tokens: Vec<&str> = text.split(' ').collect();
    let i = at % tokens.len();
    match op % 4 {
        0 => {
            tokens.remove(i);
        }
        1 => tokens.insert(i, tokens[i]),
        2 => tokens[i] = with,
        _ => {
            let j = (at / 7) % tokens.len();
            tokens.swap(i, j);
        }
    }
    tokens.join(" ")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn canonical_text_round_trips(t in target()) {
        let text = t.to_string();
        let parsed = parse(&text, "prop").map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert!(parsed.warnings.is_empty());
        prop_assert_eq!(parsed.targets, vec![t]);
    }

    #[test]
    fn canonical_table_round_trips(table in table()) {
        let text = table.to_string();
        let parsed = parse(&text, "prop").map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(parsed, table);
    }

    #[test]
    fn mutated_tables_never_panic_and_accepted_ones_are_canonical(
        t in target(),
        op in any::<u8>(),
        at in any::<usize>(),
        with in prop_oneof![
            Just("0"), Just("-1"), Just("x"), Just("99999999999999999999"), Just("local"), Just("tcp"),
            Just("ios=0"), Just("\\"), Just("#"), Just("="), Just("-"), Just("\n"), Just("open"), Just("2"),
        ],
    ) {
        let text = mutate(&t.to_string(), op, at, with);
        match parse(&text, "m") {
            Ok(table) => {
                // Whatever was accepted has a canonical form that reads back the same.
                let again = parse(&table.to_string(), "c").map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(again.targets, table.targets);
            }
            Err(e) => {
                prop_assert!(e.line >= 1 && e.col >= 1);
                prop_assert!(e.line <= text.lines().count() + 1, "{} beyond the text", e);
                prop_assert!(!e.expected.is_empty());
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[0-9a-z =:#\\\\\n\t\\[\\]-]{0,300}") {
        let _ = parse(&text, "a");
    }

    #[test]
    fn arbitrary_unicode_never_panics(text in any::<String>()) {
        let _ = parse(&text, "u");
    }
}

// ---------------------------------------------------------------- down_wait (tcp slinks)

fn tcp_slink1(policy_tokens: &str, count: u32) -> Target {
    one(&format!(
        "0 8 replicator default 3 r 0 open local 2 0 async 2 0 d0 - 0 \
         tcp {count} 1 {policy_tokens} h:7410 2 0 dev0 - 0\n"
    ))
}

#[test]
fn down_wait_parses_after_sync_and_async_and_round_trips() {
    use replicator::table::DownWait;
    let cases = [
        (
            "sync down_wait=forever",
            4,
            PolicyMode::Sync,
            Fallbehind::default(),
            DownWait::Forever,
        ),
        (
            "sync down_wait=10s",
            4,
            PolicyMode::Sync,
            Fallbehind::default(),
            DownWait::For(Duration::from_secs(10)),
        ),
        (
            "sync down_wait=0",
            3,
            PolicyMode::Sync,
            Fallbehind::default(),
            DownWait::For(Duration::ZERO),
        ),
        (
            "async ios=5 down_wait=1500ms",
            5,
            PolicyMode::Async,
            ios(5),
            DownWait::For(Duration::from_millis(1500)),
        ),
        (
            "stall down_wait=2m ios=5",
            3,
            PolicyMode::Stall,
            ios(5),
            DownWait::For(Duration::from_secs(120)),
        ),
    ];
    for (tokens, count, mode, fallbehind, wait) in cases {
        let t = tcp_slink1(tokens, count);
        assert_eq!(
            t.slinks[1].policy,
            Policy {
                mode,
                fallbehind,
                down_wait: Some(wait),
            },
            "{tokens}"
        );
        let canonical = t.to_string();
        assert!(canonical.contains("down_wait="), "{canonical}");
        assert_eq!(
            one(&canonical),
            t,
            "canonical text parses back: {canonical}"
        );
    }
    assert_eq!(tcp_slink1("sync", 3).slinks[1].policy.down_wait, None);
}

#[test]
fn malformed_down_wait_names_the_token_and_its_place() {
    let text = |tokens: &str| {
        format!(
            "0 8 replicator \\\n  default 3 r 0 open \\\n  local 2 0 async 2 0 d0 - 0 \\\n  tcp 4 1 {tokens} h:7410 2 0 dev0 - 0\n"
        )
    };
    refused(
        &text("sync down_wait=5"),
        4,
        16,
        Some("down_wait=5"),
        "`down_wait=forever`",
    );
    refused(
        &text("sync down_wait=never"),
        4,
        16,
        Some("down_wait=never"),
        "`down_wait=DURATION`",
    );
    refused(
        &text("sync down_wait=1s down_wait=2s"),
        4,
        29,
        Some("down_wait=2s"),
        "each fallbehind key once (`down_wait=` is already given at 4:16)",
    );
    // Still no fallbehind threshold on a sync slink.
    refused(
        &text("sync ios=1"),
        4,
        16,
        Some("ios=1"),
        "no fallbehind threshold after `sync`",
    );
    refused(
        "0 8 replicator default 3 r 0 open local 2 0 async 2 0 d0 - 0 local 3 1 sync down_wait=1s 2 0 d1 - 0\n",
        1,
        77,
        Some("down_wait=1s"),
        "no `down_wait=` on a `local` slink",
    );
}
