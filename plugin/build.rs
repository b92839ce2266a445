//! Compiles the C++ shim (cpp-shim/) against the exact Nix that will load the plugin.
//!
//! Nix is found through pkg-config (`nix-expr`); its version becomes preprocessor defines so that
//! cpp-shim/nix-compat.hh can pick the right API. The result loads only into that Nix: the loader
//! (loader/nix-tier-loader.cc) picks the build for the running Nix.
//! The shim is linked `+whole-archive`: its only entry points are static registrations, which the
//! linker would otherwise drop as unreferenced.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian installs Nix's pkg-config files outside the default search path.
const DEBIAN_NIX_PKGCONFIG: &str = "/usr/lib/nix/pkgconfig";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    let shim = workspace.join("cpp-shim");

    let nix = probe_nix_expr();
    let version = parse_version(&nix.version);
    let include = nix_include_dir(&workspace, &nix);
    let cflags = other_cflags(version);

    let mut build = cxx_build::bridge("src/ffi.rs");
    build.file(shim.join("shim.cc")).include(&shim);
    // -isystem: Nix's headers are not ours to warn about. Nix 2.8 and 2.24-2.27 are included as
    // <eval.hh> (include/nix), 2.28 onwards as <nix/expr/eval.hh> (include); nixpkgs splits the
    // headers of Nix's libraries over several outputs, which pkg-config lists.
    let mut include_dirs = vec![include.clone(), include.join("nix")];
    include_dirs.extend(nix.include_paths.iter().cloned());
    // /usr/include is searched anyway; as -isystem it would break libstdc++'s #include_next.
    let system_dirs = [Path::new("/usr/include"), Path::new("/usr/local/include")];
    for dir in include_dirs.iter().filter(|dir| dir.is_dir() && !system_dirs.contains(&dir.as_path())) {
        build.flag("-isystem").flag(dir.to_str().expect("UTF-8 include path"));
    }
    for flag in &cflags {
        build.flag(flag);
    }
    build
        .define("NIX_TIER_NIX_VERSION_MAJOR", version.0.to_string().as_str())
        .define("NIX_TIER_NIX_VERSION_MINOR", version.1.to_string().as_str())
        .define("NIX_TIER_NIX_VERSION_PATCH", version.2.to_string().as_str())
        .flag_if_supported("-Wno-deprecated-declarations")
        .link_lib_modifier("+whole-archive")
        .compile("nix_tier_shim");

    for path in &nix.link_paths {
        println!("cargo:rustc-link-search=native={}", path.display());
        // Lets the unit-test binary find libnix*.so; inside Nix they are already loaded.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", path.display());
    }
    for lib in &nix.libs {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    for file in ["shim.cc", "nix-compat.hh"] {
        println!("cargo:rerun-if-changed={}", shim.join(file).display());
    }
    println!("cargo:rerun-if-changed=src/ffi.rs");
    println!("cargo:rerun-if-env-changed=NIX_TIER_NIX_INCLUDE");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
}

fn probe_nix_expr() -> pkg_config::Library {
    let probe = || pkg_config::Config::new().cargo_metadata(false).probe("nix-expr");
    if let Ok(lib) = probe() {
        return lib;
    }
    let path = match env::var("PKG_CONFIG_PATH") {
        Ok(p) if !p.is_empty() => format!("{DEBIAN_NIX_PKGCONFIG}:{p}"),
        _ => DEBIAN_NIX_PKGCONFIG.to_string(),
    };
    env::set_var("PKG_CONFIG_PATH", path);
    probe().unwrap_or_else(|e| {
        panic!(
            "nix-tier: pkg-config cannot find `nix-expr` ({e}).\n\
             Install Nix's development files: on Debian bookworm run ./scripts/setup; \
             with Nix, build through flake.nix (`nix build` or `nix develop`)."
        )
    })
}

/// Finds the directory holding Nix's headers: `nix/eval.hh` (Nix 2.8 to 2.27) or
/// `nix/expr/eval.hh` (2.28 onwards).
fn nix_include_dir(workspace: &Path, nix: &pkg_config::Library) -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = env::var("NIX_TIER_NIX_INCLUDE") {
        candidates.push(dir.into());
    }
    candidates.push(workspace.join("build/nix-headers").join(&nix.version));
    for path in &nix.include_paths {
        candidates.push(path.clone());
        candidates.extend(path.parent().map(Path::to_path_buf));
    }
    let has_headers =
        |dir: &&PathBuf| dir.join("nix/eval.hh").is_file() || dir.join("nix/expr/eval.hh").is_file();
    if let Some(found) = candidates.iter().find(has_headers) {
        return found.clone();
    }
    panic!(
        "nix-tier: found Nix {} through pkg-config, but not its headers (nix/eval.hh or \
         nix/expr/eval.hh) in any of: {}.\n\
         Debian's nix-bin ships no headers: run ./scripts/setup, which unpacks them from Debian's \
         `nix` source package, or set NIX_TIER_NIX_INCLUDE to a directory containing nix/eval.hh.",
        nix.version,
        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// The compiler flags pkg-config gives for `nix-expr` besides include paths (the C++ standard Nix's
/// headers need, for one); Nix 2.8's pkg-config file says c++17, later ones c++2a or c++23.
fn other_cflags(version: (u32, u32, u32)) -> Vec<String> {
    let output = Command::new("pkg-config")
        .args(["--cflags-only-other", "nix-expr"])
        .output()
        .unwrap_or_else(|e| panic!("nix-tier: cannot run pkg-config: {e}"));
    let mut flags: Vec<String> =
        String::from_utf8_lossy(&output.stdout).split_whitespace().map(str::to_owned).collect();
    if !flags.iter().any(|flag| flag.starts_with("-std=")) {
        flags.push(if version >= (2, 24, 0) { "-std=c++20" } else { "-std=c++17" }.to_owned());
    }
    flags
}

fn parse_version(version: &str) -> (u32, u32, u32) {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}
