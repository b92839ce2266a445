//! The plugin's loader (loader/nix-tier-loader.cc), the file `plugin-files` names, inside the real
//! Nix under test: it loads the plugin build made for exactly the running Nix, and whatever else
//! it is given, Nix starts, evaluates, and prints one warning that names both versions and what to
//! rebuild.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix_tier_tests::{nix_version, plugin_build, plugin_dir, plugin_path, stderr, NixSandbox};

/// An installation like a package's: the loader and, for each `(version, library)`, the library
/// as the build for that Nix version. Returns the loader's path.
fn install(sandbox: &NixSandbox, builds: &[(&str, &Path)]) -> PathBuf {
    let dir = sandbox.path().join("plugin");
    for (version, library) in builds {
        let build_dir = dir.join("nix-tier-plugin").join(version);
        fs::create_dir_all(&build_dir).unwrap();
        symlink(library, build_dir.join("libnix_tier_plugin.so")).unwrap();
    }
    let loader = dir.join("libnix_tier_loader.so");
    fs::create_dir_all(&dir).unwrap();
    symlink(plugin_path(), &loader).unwrap();
    loader
}

/// The plugin builds for other Nix versions that scripts/setup and scripts/check-newer-nix made
/// (this machine's Nix and the newer one): real builds whose Nix symbols differ from this Nix's.
fn builds_for_other_nixes() -> Vec<(String, PathBuf)> {
    let this = nix_version();
    let builds: Vec<(String, PathBuf)> = fs::read_dir(plugin_dir().join("nix-tier-plugin"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|version| *version != this)
        .map(|version| {
            let library = plugin_dir().join("nix-tier-plugin").join(&version).join("libnix_tier_plugin.so");
            (version, library)
        })
        .filter(|(_, library)| library.is_file())
        .collect();
    assert!(
        !builds.is_empty(),
        "no plugin build for a Nix other than {this} in {}: scripts/check-newer-nix makes one",
        plugin_dir().display()
    );
    builds
}

/// `nix-instantiate --eval --expr 1` and `builtins ? hardwareProfile` with the loader at `loader`:
/// asserts that Nix works and returns whether the builtins are there and Nix's warnings.
fn evaluate_with(loader: &Path) -> (bool, Vec<String>) {
    let sandbox = NixSandbox::with_conf(&format!("plugin-files = {}", loader.display()));
    let out = sandbox.eval_with("1", &[]);
    assert!(out.status.success(), "Nix does not start with {}:\n{}", loader.display(), stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let warnings: Vec<String> = stderr(&out).lines().filter(|l| l.contains("nix-tier")).map(str::to_owned).collect();
    let out = sandbox.eval_with("builtins ? hardwareProfile && builtins ? optimizeFor", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    (String::from_utf8_lossy(&out.stdout).trim() == "true", warnings)
}

/// The one warning expected, checked for the fragments it must contain.
fn assert_one_warning(warnings: &[String], fragments: &[&str]) {
    assert_eq!(warnings.len(), 1, "exactly one warning expected: {warnings:#?}");
    for fragment in fragments {
        assert!(warnings[0].contains(fragment), "the warning lacks {fragment:?}: {}", warnings[0]);
    }
}

#[test]
fn loader_refers_to_no_nix_symbol() {
    let out = Command::new("nm").args(["-D", "--undefined-only"]).arg(plugin_path()).output().expect("run nm");
    assert!(out.status.success(), "{}", stderr(&out));
    let undefined = String::from_utf8_lossy(&out.stdout);
    let nix: Vec<&str> = undefined.lines().filter(|l| l.contains("3nix") || l.contains(" nix_")).collect();
    assert!(nix.is_empty(), "the loader needs Nix symbols, so a Nix without them could not load it: {nix:?}");
    assert!(undefined.contains("dlopen"), "nm listed no dlopen: {undefined}");
}

#[test]
fn loader_loads_the_build_for_the_running_nix_only() {
    let this = nix_version();
    let sandbox = NixSandbox::with_conf("");
    // This Nix's own build, also filed under another version: the loader must pick by version.
    let loader = install(&sandbox, &[(&this, &plugin_build()), ("2.7.0", &plugin_build())]);
    let (builtins, warnings) = evaluate_with(&loader);
    assert!(builtins, "the loader did not load the build for Nix {this}");
    assert!(warnings.is_empty(), "{warnings:#?}");
}

#[test]
fn loader_without_a_build_for_the_running_nix_warns_once_and_nix_carries_on() {
    let this = nix_version();
    let sandbox = NixSandbox::with_conf("");
    // Real builds for the other Nix versions, and this Nix's own build under a version it is not:
    // loading any of them would register the builtins (or break Nix).
    let others = builds_for_other_nixes();
    let mut builds: Vec<(&str, &Path)> = others.iter().map(|(v, p)| (v.as_str(), p.as_path())).collect();
    let own = plugin_build();
    builds.push(("2.7.0", &own));
    let loader = install(&sandbox, &builds);
    let (builtins, warnings) = evaluate_with(&loader);
    assert!(!builtins, "the loader loaded a build made for another Nix");
    let mut fragments = vec![format!("no plugin build for Nix {this}"), "2.7.0".to_owned(), "rebuild".to_owned()];
    fragments.extend(others.iter().map(|(version, _)| version.clone()));
    assert_one_warning(&warnings, &fragments.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn loader_given_a_build_that_needs_symbols_nix_lacks_warns_once_and_nix_carries_on() {
    let this = nix_version();
    let sandbox = NixSandbox::with_conf("");
    // A library needing one Nix symbol this Nix lacks, as any build for another Nix does.
    let source = sandbox.write("missing.c", "extern void _ZN3nix18nixTierNoSuchThingEv(void);\n\
         void (*nix_tier_needs)(void) = _ZN3nix18nixTierNoSuchThingEv;\n");
    let library = sandbox.path().join("libmissing.so");
    let out = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&library).arg(&source).output().expect("run cc");
    assert!(out.status.success(), "cc failed: {}", stderr(&out));
    let loader = install(&sandbox, &[(&this, &library)]);
    let (builtins, warnings) = evaluate_with(&loader);
    assert!(!builtins);
    assert_one_warning(&warnings, &[&format!("build for Nix {this} does not load into Nix {this}"), "nixTierNoSuchThing", "rebuild"]);

    // The same with real builds for other Nix versions filed under this one.
    for (version, build) in builds_for_other_nixes() {
        let sandbox = NixSandbox::with_conf("");
        let loader = install(&sandbox, &[(&this, &build)]);
        let (builtins, warnings) = evaluate_with(&loader);
        assert!(!builtins, "the build for Nix {version} registered builtins in Nix {this}");
        assert_one_warning(&warnings, &[&format!("does not load into Nix {this}"), "rebuild"]);
    }
}
