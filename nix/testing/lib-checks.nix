# Checks of nix/lib.nix that need nothing but builtins: evaluated by tests/tests/nix_files.rs
# and by the flake's checks.<system>.nix-files. `failures` lists the checks whose `got` differs
# from `expected` (empty when all pass).
let
  tier = import ../lib.nix;
  skylake = tier.profileFromJSON ../examples/skylake.json;
  # A profile without a build section: the default formula applies (docs/profile.md).
  bare = builtins.removeAttrs skylake [ "build" ] // { memory.totalMiB = 16384; cpu = skylake.cpu // { threads = 8; }; };
  arm = {
    schemaVersion = 1;
    system = "aarch64-linux";
    cpu = {
      vendor = "ARM";
      modelName = null;
      microarchitecture = "neoverse_n1";
      isaLevel = "armv8.2-a";
      gcc = { arch = "armv8.2-a"; tune = "neoverse-n1"; };
      rustTargetCpu = "neoverse-n1";
      goamd64 = null;
      features = [ "asimd" "fp" ];
      physicalCores = 4;
      threads = 4;
    };
    memory.totalMiB = 8192;
  };

  checks = {
    ladderX86 = {
      got = map tier.isaLadder [ "x86-64" "x86-64-v2" "x86-64-v3" "x86-64-v4" ];
      expected = [
        [ "x86-64" ]
        [ "x86-64-v2" "x86-64" ]
        [ "x86-64-v3" "x86-64-v2" "x86-64" ]
        [ "x86-64-v4" "x86-64-v3" "x86-64-v2" "x86-64" ]
      ];
    };
    ladderArm = {
      got = map tier.isaLadder [ "armv8-a" "armv8.2-a" "armv9-a" ];
      expected = [
        [ "armv8-a" ]
        [ "armv8.2-a" "armv8.1-a" "armv8-a" ]
        [ "armv9-a" "armv8.5-a" "armv8.4-a" "armv8.3-a" "armv8.2-a" "armv8.1-a" "armv8-a" ]
      ];
    };
    ladderUnknown = { got = tier.isaLadder "rv64gc"; expected = [ "rv64gc" ]; };

    gccPlatform = { got = tier.gccPlatform skylake; expected = { gcc = { arch = "skylake"; tune = "skylake"; }; }; };
    hostPlatform = {
      got = tier.hostPlatform arm;
      expected = { system = "aarch64-linux"; gcc = { arch = "armv8.2-a"; tune = "neoverse-n1"; }; };
    };

    gccarchSkylake = {
      got = tier.gccarchFeatures skylake;
      expected = [ "gccarch-skylake" "gccarch-x86-64-v3" "gccarch-x86-64-v2" "gccarch-x86-64" ];
    };
    gccarchWithNixpkgsInferiors = {
      # The shape of nixpkgs' lib.systems.architectures.inferiors.
      got = tier.gccarchFeaturesWith { skylake = [ "broadwell" "haswell" "x86-64-v3" ]; } skylake;
      expected = [ "gccarch-skylake" "gccarch-x86-64-v3" "gccarch-x86-64-v2" "gccarch-x86-64" "gccarch-broadwell" "gccarch-haswell" ];
    };
    gccarchArm = {
      got = tier.gccarchFeatures arm;
      expected = [ "gccarch-armv8.2-a" "gccarch-armv8.1-a" "gccarch-armv8-a" ];
    };
    systemFeatures = {
      got = tier.systemFeatures skylake;
      expected = [ "nixos-test" "benchmark" "big-parallel" "kvm" "gccarch-skylake" "gccarch-x86-64-v3" "gccarch-x86-64-v2" "gccarch-x86-64" ];
    };

    # docs/profile.md's example: 8 threads and 16 GiB.
    defaultBuild = {
      got = tier.buildOf bare;
      expected = {
        memoryBudgetMiB = 14336;
        defaultTier = "light";
        rules = [ ];
        tiers = {
          heavy = { maxJobs = 1; cores = 8; memoryMiB = 10752; };
          medium = { maxJobs = 2; cores = 4; memoryMiB = 5376; };
          light = { maxJobs = 5; cores = 2; memoryMiB = 2150; };
        };
      };
    };
    maxJobsPinned = { got = tier.maxJobs skylake; expected = 12; };
    maxJobsDefault = { got = tier.maxJobs bare; expected = 5; };

    mergeProfile = {
      got = (tier.mergeProfile skylake { build.tiers.light.maxJobs = 10; build.rules = [ ]; }).build;
      expected = skylake.build // { rules = [ ]; tiers = skylake.build.tiers // { light = skylake.build.tiers.light // { maxJobs = 10; }; }; };
    };

    pluginVersions = {
      got = map tier.pluginSupportsNix [ "2.7.0" "2.8.0" "2.8.1" "2.9.0" "2.23.4" "2.24.0" "2.28.3" "2.34.8" "2.35.0" "2.93.3" ];
      expected = [ false true true false false true true true true false ];
    };
    slotWakeupVersions = {
      got = map tier.nixLosesSlotWakeups [ "2.34.8" "2.35.0" "2.35.1" "2.35.1pre20260701_0123abc" "2.35.2" "2.35.10" "2.36.0" "2.93.3" ];
      expected = [ false true true true false false false false ];
    };
    hookVersions = {
      got = map tier.hookSupportsNix [ "2.8.0" "2.34.0" "2.93.3" "2.94.0" ];
      expected = [ true true true false ];
    };

    pluginFile = {
      got = [ (tier.pluginFile "/x/libnix_tier_loader.so") (tier.pluginFile { type = "derivation"; outPath = "/nix/store/p"; }) ];
      expected = [ "/x/libnix_tier_loader.so" "/nix/store/p/lib/libnix_tier_loader.so" ];
    };
    hookFile = {
      got = tier.hookFile { type = "derivation"; outPath = "/nix/store/h"; };
      expected = "/nix/store/h/bin/nix-tier-hook";
    };

    # The plugin alone needs the gccarch features too: optimizeFor's builds require them.
    nixConfPluginOnly = {
      got = tier.nixConf { plugin = "/p.so"; profile = skylake; };
      expected = "hardware-profile = ${tier.profileFile skylake}\nplugin-files = /p.so\n"
        + "extra-system-features = gccarch-skylake gccarch-x86-64-v3 gccarch-x86-64-v2 gccarch-x86-64\n";
    };
    # With nixpkgs' inferiors table, the named architectures below the CPU's too.
    nixConfInferiors = {
      got = tier.nixConf { plugin = "/p.so"; profile = skylake; inferiors.skylake = [ "broadwell" "haswell" ]; };
      expected = "hardware-profile = ${tier.profileFile skylake}\nplugin-files = /p.so\n"
        + "extra-system-features = gccarch-skylake gccarch-x86-64-v3 gccarch-x86-64-v2 gccarch-x86-64 gccarch-broadwell gccarch-haswell\n";
    };
    # Without the plugin, hardware-profile would be an unknown setting: left out.
    nixConfHookOnly = {
      got = tier.nixConf { hook = "/h"; profile = skylake; pollInterval = 2; };
      expected = "build-hook = /h\nbuild-poll-interval = 2\nmax-jobs = 12\n"
        + "extra-system-features = gccarch-skylake gccarch-x86-64-v3 gccarch-x86-64-v2 gccarch-x86-64\n";
    };
    # Nix asks again about a postponed build at every wake-up of its worker.
    nixConfDefaultPollInterval = {
      got = tier.nixConf { hook = "/h"; };
      expected = "build-hook = /h\nbuild-poll-interval = 0\n";
    };
    nixConfExtraSettings = {
      got = tier.nixConf { settings = { cores = 4; keep-going = true; }; };
      expected = "cores = 4\nkeep-going = true\n";
    };
  };

  names = builtins.attrNames checks;
in
{
  inherit checks;
  failures = builtins.filter (name: checks.${name}.got != checks.${name}.expected) names;
  details = map (name: { inherit name; inherit (checks.${name}) got expected; })
    (builtins.filter (name: checks.${name}.got != checks.${name}.expected) names);
}
