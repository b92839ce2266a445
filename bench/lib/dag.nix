# A DAG of test-builder derivations from a spec written by bench/lib/workload.py:
# { "top": NAME, "builds": [ { "name", "tier", "ms", "mib", "deps": [NAME] } ] }.
# Each build runs nix-tier-testbuilder (testbuilder/src/main.rs): it allocates and holds `mib`
# MiB, sleeps `ms` ms, records its interval in recordDir, and fails if a dependency's output is
# missing. NIX_TIER carries the tier to the hook (as builtins.optimizeFor would).
{ spec, builder, recordDir, system ? builtins.currentSystem }:
let
  s = builtins.fromJSON (builtins.readFile spec);
  builderInStore = builtins.path { path = /. + builder; name = "nix-tier-testbuilder"; };
  drvs = builtins.listToAttrs (map (b: { name = b.name; value = mk b; }) s.builds);
  mk = b: derivation {
    inherit (b) name;
    inherit system;
    builder = builderInStore;
    NIX_TIER = b.tier;
    TB_SLEEP_MS = toString b.ms;
    TB_MEM_MIB = toString b.mib;
    TB_DEPS = toString (map (d: drvs.${d}) b.deps);
    RECORD_DIR = recordDir;
  };
in
drvs.${s.top}
