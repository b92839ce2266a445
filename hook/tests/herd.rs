//! Nix's herd: when a slot of a Nix worker frees, it asks about every goal waiting for one, each
//! with a free slot, before any of them starts. The broker answers all but one of them "worker
//! full", and the hook then gives that answer by itself, until the broker says a slot of the
//! worker may be free again. These tests hold it to that: a build asked about after a slot
//! freed gets its lease.

mod common;

use std::fs;

use common::{write_drv, Setup};

/// The names of the builds holding leases, as `nix-tier status --json` shows them.
fn running(setup: &Setup) -> Vec<String> {
    let status = common::json(&common::nix_tier(&setup.state(), &["status", "--json"]));
    let mut names: Vec<String> =
        status["running"].as_array().expect("running builds").iter().filter_map(|l| Some(l["name"].as_str()?.to_string())).collect();
    names.sort();
    names
}

/// Waits until exactly `names` hold leases (`state.json` follows the broker within 100 ms).
fn wait_running(setup: &Setup, names: &[&str]) {
    nix_tier_tests::hook_env::wait_for(&format!("{names:?} running"), common::ANSWER_TIMEOUT, || {
        (running(setup) == names).then_some(())
    });
}

#[test]
fn a_full_worker_is_answered_without_leases_until_a_slot_frees() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook_with(&setup.profile(), &[("max-jobs", "1")]);
    // Nix locks a build's outputs before it asks, and deletes the locks once the build succeeded.
    let ask = |hook: &mut common::Hook, name: &str| {
        let (drv, out) = write_drv(setup.path(), name);
        let lock_path = format!("{}.lock", out.display());
        let lock = fs::File::create(&lock_path).unwrap();
        lock.lock().unwrap();
        let lines = hook.ask(&drv);
        assert_eq!(lines.last().map(String::as_str), Some("# decline"), "{name}: {lines:?}");
        (lock_path, lock)
    };
    let first = ask(&mut hook, "first-1.0");
    wait_running(&setup, &["first-1.0"]);
    // The worker's one slot is taken: the broker says so, and the next the hook says by itself.
    // Neither takes a lease (the light tier has room for four).
    let _second = ask(&mut hook, "second-1.0");
    let _third = ask(&mut hook, "third-1.0");
    assert_eq!(running(&setup), ["first-1.0"]);
    // The first build succeeds: its lease ends, and the broker tells the hook.
    fs::remove_file(&first.0).unwrap();
    drop(first.1);
    wait_running(&setup, &[]);
    // So the next build is asked about, and admitted.
    let _fourth = ask(&mut hook, "fourth-1.0");
    wait_running(&setup, &["fourth-1.0"]);
}

#[test]
fn the_builds_a_hook_declines_by_itself_are_told_to_the_broker_once_nix_is_quiet() {
    let setup = Setup::new(8000);
    let mut hook = setup.hook_with(&setup.profile(), &[("max-jobs", "1")]);
    let mut locks = Vec::new();
    let mut ask = |hook: &mut common::Hook, name: &str| {
        let (drv, out) = write_drv(setup.path(), name);
        let lock = fs::File::create(format!("{}.lock", out.display())).unwrap();
        lock.lock().unwrap();
        locks.push(lock);
        let lines = hook.ask(&drv);
        assert_eq!(lines.last().map(String::as_str), Some("# decline"), "{name}: {lines:?}");
        drv
    };
    ask(&mut hook, "first-1.0");
    wait_running(&setup, &["first-1.0"]);
    // Asked by the broker (worker full), then declined by the hook alone, in one burst: sent
    // whole once, then named by its .drv, each request counted.
    let second = ask(&mut hook, "second-1.0");
    ask(&mut hook, "third-1.0");
    hook.ask(&second);
    nix_tier_tests::hook_env::wait_for("the burst's declines to be counted", common::ANSWER_TIMEOUT, || {
        (setup.tries() == [1, 1, 2]).then_some(())
    });
    hook.ask(&second);
    hook.ask(&second);
    nix_tier_tests::hook_env::wait_for("the next burst's declines to be counted", common::ANSWER_TIMEOUT, || {
        (setup.tries() == [1, 1, 4]).then_some(())
    });
    assert_eq!(running(&setup), ["first-1.0"]);
}
