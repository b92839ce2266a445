# nix-tier's Nix library: pure functions of a hardware profile (docs/profile.md).
#
# Only builtins are used, so this file works without nixpkgs: `import ./nix/lib.nix`, or the
# flake's `lib` output. The NixOS and home-manager modules build on it. Every public function
# has a doc comment (`/** … */`) that scripts/gen-reference copies into docs/reference.md.
let
  inherit (builtins)
    attrNames
    compareVersions
    concatStringsSep
    elem
    filter
    foldl'
    fromJSON
    genList
    isAttrs
    isBool
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    map
    match
    readFile
    toJSON
    toString
    ;

  min = a: b: if a < b then a else b;
  max = a: b: if a > b then a else b;
  clamp = lo: hi: x: min (max x lo) hi;
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
  atLeast = version: wanted: compareVersions version wanted >= 0;
  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  # x86-64 micro-architecture levels, lowest first (gcc's spelling, as `cpu.isaLevel` has them).
  x86Levels = [ "x86-64" "x86-64-v2" "x86-64-v3" "x86-64-v4" ];

  # Position of `x` in `list`, or null.
  indexOf = x: list:
    let
      go = i: if i >= length list then null else if builtins.elemAt list i == x then i else go (i + 1);
    in
    go 0;

  armLadder = level:
    let
      v8 = match "armv8(\\.([0-9]+))?-a" level;
      v9 = match "armv9(\\.([0-9]+))?-a" level;
      minor = m: if builtins.elemAt m 1 == null then 0 else builtins.fromJSON (builtins.elemAt m 1);
      name = major: n: if n == 0 then "armv${major}-a" else "armv${major}.${toString n}-a";
      # armv8.n-a down to armv8-a.
      down8 = n: genList (i: name "8" (n - i)) (n + 1);
    in
    if v8 != null then
      down8 (minor v8)
    else if v9 != null then
      # Armv9.n-a includes Armv8.(n+5)-a (Arm ARM: 9.0 ⊇ 8.5, 9.1 ⊇ 8.6, ...).
      genList (i: name "9" (minor v9 - i)) (minor v9 + 1) ++ down8 (minor v9 + 5)
    else
      null;

  self = {
    /**
      The profile in a JSON file (as `nix-tier profile` writes it), as an attribute set.
      `profileFromJSON ./hardware-profile.json`.
    */
    profileFromJSON = path: fromJSON (readFile path);

    /**
      A profile attribute set as JSON text (the inverse of `profileFromJSON`), e.g. for
      `pkgs.writeText "hardware-profile.json" (profileJSON profile)`.
    */
    profileJSON = profile: toJSON profile;

    /**
      `overrides` merged over `base`, recursively for attribute sets; lists and other values in
      `overrides` replace those of `base`. For a committed profile with a few settings changed:
      `mergeProfile (profileFromJSON ./hw.json) { build.tiers.heavy.cores = 7; }`.
    */
    mergeProfile = base: overrides:
      let
        merge = a: b:
          if isAttrs a && isAttrs b then
            a // listToAttrs (map (name: {
              inherit name;
              value = if a ? ${name} then merge a.${name} b.${name} else b.${name};
            }) (attrNames b))
          else
            b;
      in
      merge base overrides;

    /**
      The profile the modules' options describe: `profile` (a JSON file, or null) with
      `profileSettings` (attributes) merged over it; either alone is the whole profile.
    */
    pinnedProfile = { profile, profileSettings }:
      if profileSettings == { } then self.profileFromJSON profile
      else if profile == null then profileSettings
      else self.mergeProfile (self.profileFromJSON profile) profileSettings;

    /**
      The file for the `hardware-profile` setting from the same options: `profile` itself when
      nothing is merged over it, else the merged profile written with `writeText` (nixpkgs'
      `pkgs.writeText`).
    */
    pinnedProfileFile = writeText: { profile, profileSettings }@options:
      if profileSettings == { } then "${profile}"
      else writeText "hardware-profile.json" (self.profileJSON (self.pinnedProfile options));

    /**
      The `build` section of a profile: its own, or the one the default formula derives from
      `cpu.threads` and `memory.totalMiB` when it has none (docs/profile.md, "Default tiers";
      the same integer arithmetic as the `nix-tier-model` crate).
    */
    buildOf = profile: profile.build or (self.defaultBuild profile);

    /**
      The `build` section the default formula gives `profile`'s threads and memory:
      `{ memoryBudgetMiB; defaultTier = "light"; rules = [ ]; tiers = { heavy; medium; light; }; }`.
    */
    defaultBuild = profile:
      let
        threads = max 1 profile.cpu.threads;
        total = profile.memory.totalMiB;
        reserve = min (max (total / 8) 1024) (total / 2);
        budget = max 1 (total - reserve);
        share = budget - budget / 4;
        light = clamp 1 threads (share / 2048);
        medium = min (clamp 1 4 (threads / 4)) light;
      in
      {
        memoryBudgetMiB = budget;
        defaultTier = "light";
        rules = [ ];
        tiers = {
          heavy = { maxJobs = 1; cores = threads; memoryMiB = share; };
          medium = { maxJobs = medium; cores = max 1 (threads / medium); memoryMiB = share / medium; };
          light = { maxJobs = light; cores = clamp 1 2 (threads / 4); memoryMiB = share / light; };
        };
      };

    /**
      Nix's `max-jobs` for the hook: the largest `maxJobs` of the tiers (the light tier's, in
      every profile the default formula makes). Nix then offers the hook as many builds as the
      busiest tier may run, and the hook holds back whatever its tier or the budget cannot take.
    */
    maxJobs = profile:
      let tiers = (self.buildOf profile).tiers;
      in foldl' max 1 (map (t: tiers.${t}.maxJobs) [ "heavy" "medium" "light" ]);

    /**
      `{ gcc = { arch; tune; }; }` from the profile's `cpu.gcc`, to merge into
      `nixpkgs.hostPlatform` (which rebuilds everything for the CPU; see docs/guide-adr-028.md).
    */
    gccPlatform = profile: { gcc = { inherit (profile.cpu.gcc) arch tune; }; };

    /**
      `{ system; gcc = { arch; tune; }; }`: a complete `nixpkgs.hostPlatform` for the profile.
    */
    hostPlatform = profile: { inherit (profile) system; } // self.gccPlatform profile;

    /**
      The ISA level and every level below it that the CPU can run too, highest first:
      `"x86-64-v3"` → `[ "x86-64-v3" "x86-64-v2" "x86-64" ]`; `"armv8.2-a"` →
      `[ "armv8.2-a" "armv8.1-a" "armv8-a" ]`; Armv9.n-a also lists Armv8.(n+5)-a and below.
      An unknown level is returned alone.
    */
    isaLadder = level:
      let
        i = indexOf level x86Levels;
        arm = armLadder level;
      in
      if i != null then genList (k: builtins.elemAt x86Levels (i - k)) (i + 1)
      else if arm != null then arm
      else [ level ];

    /**
      The `gccarch-*` system features of a machine with this profile: its own `cpu.gcc.arch`,
      its `cpu.isaLevel` and every ISA level below. A derivation built with `gcc.arch = X`
      (nixpkgs) or by `builtins.optimizeFor` for target X requires `gccarch-X`; the machine can
      run code for each of these, so it may build them. Named micro-architectures between the
      ISA level and the CPU's own (`haswell` under `skylake`) are only known from nixpkgs'
      table: see `gccarchFeaturesWith`.
    */
    gccarchFeatures = profile: self.gccarchFeaturesWith { } profile;

    /**
      `gccarchFeatures`, plus the inferior architectures nixpkgs lists for `cpu.gcc.arch` in
      `inferiors` (pass `lib.systems.architectures.inferiors` from nixpkgs; `{ }` without it).
    */
    gccarchFeaturesWith = inferiors: profile:
      let arch = profile.cpu.gcc.arch;
      in map (a: "gccarch-${a}") (unique ([ arch ] ++ self.isaLadder profile.cpu.isaLevel ++ (inferiors.${arch} or [ ])));

    /**
      The features NixOS advertises by default: `nixos-test`, `benchmark`, `big-parallel`, `kvm`.
    */
    defaultSystemFeatures = [ "nixos-test" "benchmark" "big-parallel" "kvm" ];

    /**
      A complete `system-features` list for the profile's machine: `defaultSystemFeatures` plus
      `gccarchFeatures`. `system-features` replaces Nix's default list, hence the defaults.
    */
    systemFeatures = profile: self.defaultSystemFeatures ++ self.gccarchFeatures profile;

    /**
      Whether the plugin (cpp-shim/nix-compat.hh) can be built against Nix `version`: Nix 2.8,
      and Nix 2.24 onwards. Not Lix (versions 2.90 to 2.99), whose plugin interface differs.
    */
    pluginSupportsNix = version:
      (atLeast version "2.8pre" && !(atLeast version "2.9pre"))
      || (atLeast version "2.24pre" && !(atLeast version "2.90pre" && !(atLeast version "3.0pre")));

    /**
      Whether Nix `version` ignores `build-hook` in nix.conf and needs it as `--option build-hook`
      on its command line (Nix 2.25 to 2.33; fixed in 2.34 by NixOS/nix#15083).
    */
    buildHookNeedsCommandLine = version: atLeast version "2.25pre" && !(atLeast version "2.34pre");

    /**
      Whether the hook can talk to Nix `version`: everything that speaks the text hook protocol.
      Lix 2.94 (versions 2.90 and up are Lix's) replaced it with Cap'n Proto.
    */
    hookSupportsNix = version: !(atLeast version "2.94pre");

    /**
      What `plugin-files` names: `plugin` itself when it is a path or a string, else the
      package's loader `<plugin>/lib/libnix_tier_loader.so`, which loads the plugin build for the
      running Nix (or warns once, and Nix carries on).
    */
    pluginFile = plugin:
      if isPath plugin || isString plugin then toString plugin else "${plugin}/lib/libnix_tier_loader.so";

    /**
      The hook program: `hook` itself when it is a path or a string, else
      `<hook>/bin/nix-tier-hook` of the package.
    */
    hookFile = hook: if isPath hook || isString hook then toString hook else "${hook}/bin/nix-tier-hook";

    /**
      A path to the profile as a file: a path or string is used as it is; an attribute set is
      written to the store as JSON (`builtins.toFile`).
    */
    profileFile = profile:
      if isPath profile || isString profile then toString profile
      else builtins.toFile "hardware-profile.json" (self.profileJSON profile);

    /**
      The profile as an attribute set: read when it is a path or string, as it is otherwise.
    */
    loadProfile = profile: if isPath profile || isString profile then self.profileFromJSON profile else profile;

    /**
      The nix.conf settings nix-tier needs, as an attribute set (`null` values left out):

      - `plugin` (package or .so path): `plugin-files`, and `hardware-profile` when a profile is
        given (the setting is the plugin's: Nix rejects it without the plugin);
      - `hook` (package or program path): `build-hook` and `build-poll-interval`
        (`pollInterval`, default 1 second);
      - `profile` (path, string or attribute set): besides `hardware-profile`, `max-jobs`
        (`maxJobs profile`) and `extra-system-features` (`gccarchFeatures profile`, added to
        Nix's own defaults, `kvm` included) when a hook is given;
      - `settings`: more settings, overriding these.
    */
    nixConfSettings =
      { plugin ? null
      , hook ? null
      , profile ? null
      , pollInterval ? 1
      , settings ? { }
      }:
      let
        data = if profile == null then null else self.loadProfile profile;
        all = {
          plugin-files = if plugin == null then null else [ (self.pluginFile plugin) ];
          hardware-profile = if plugin == null || profile == null then null else self.profileFile profile;
          build-hook = if hook == null then null else self.hookFile hook;
          build-poll-interval = if hook == null then null else pollInterval;
          max-jobs = if hook == null || data == null then null else self.maxJobs data;
          extra-system-features = if hook == null || data == null then null else self.gccarchFeatures data;
        } // settings;
      in
      listToAttrs (map (name: { inherit name; value = all.${name}; }) (filter (name: all.${name} != null) (attrNames all)));

    /**
      nix.conf text for a settings attribute set, one `name = value` line each, as NixOS writes
      them: lists space-separated, booleans `true`/`false`; `extra-*` settings last.
    */
    renderNixConf = settings:
      let
        value = v:
          if isList v then concatStringsSep " " (map value v)
          else if isBool v then (if v then "true" else "false")
          else if isInt v then toString v
          else toString v;
        names = attrNames settings;
        isExtra = name: match "extra-.*" name != null;
        ordered = filter (n: !isExtra n) names ++ filter isExtra names;
      in
      concatStringsSep "" (map (name: "${name} = ${value settings.${name}}\n") ordered);

    /**
      The nix.conf fragment for `nixConfSettings` arguments, as text:
      `nixConf { plugin = nix-tier-plugin; hook = nix-tier; profile = ./hardware-profile.json; }`.
    */
    nixConf = args: self.renderNixConf (self.nixConfSettings args);
  };
in
self
