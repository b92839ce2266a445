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

  # The profile schema (`profileSchema`, documented there).
  schema =
    let
      string = { kind = "string"; };
      integer = min: max: { kind = "integer"; inherit min max; };
      # u32 and u64 in the model; counts and sizes of at least 1 where it checks that.
      u32From = min: integer min 4294967295;
      u64From = min: integer min null;
      enum = values: { kind = "enum"; inherit values; };
      nullOr = of: { kind = "nullOr"; inherit of; };
      list = of: { kind = "list"; inherit of; };
      object = fields: { kind = "object"; inherit fields; };
      optional = type: type // { optional = true; };
      tier = enum [ "heavy" "medium" "light" ];
      limits = object { maxJobs = u32From 1; cores = u32From 1; memoryMiB = u64From 1; };
    in
    object {
      schemaVersion = enum [ 1 ];
      source = optional (enum [ "detected" "pinned" ]);
      system = string;
      cpu = object {
        vendor = string;
        modelName = optional (nullOr string);
        microarchitecture = string;
        isaLevel = string;
        gcc = object { arch = string; tune = string; };
        rustTargetCpu = string;
        goamd64 = optional (nullOr (enum [ "v1" "v2" "v3" "v4" ]));
        features = list string;
        physicalCores = u32From 1;
        threads = u32From 1;
      };
      memory = object { totalMiB = u64From 1; };
      swap = optional (object {
        totalMiB = u64From 0;
        zram = optional (list (object { device = string; sizeMiB = u64From 0; algorithm = optional (nullOr string); }));
      });
      gpus = optional (list (object { vendor = string; driver = optional (nullOr string); pciId = string; }));
      build = optional (object {
        memoryBudgetMiB = u64From 1;
        defaultTier = tier;
        rules = optional (list (object { match = { kind = "pattern"; }; tier = tier; }));
        tiers = object { heavy = limits; medium = limits; light = limits; };
        mode = optional (enum [ "learned" "tiers" ]);
        caps = optional (list tier);
      });
    };

  # A profile file that exists (a path, or an absolute string), else an error naming the option.
  readableProfile = option: profile:
    if builtins.hasContext (toString profile) || builtins.pathExists profile then profile
    else throw "${option}.profile: ${toString profile} does not exist. Create it on the machine with 'nix-tier profile > ${toString profile}' and commit it with your configuration, or set ${option}.profile = null (docs/profile.md).";

  # JSON words for a Nix value, as the model's errors use them.
  describe = v:
    if isString v then "the string ${toJSON v}"
    else if isInt v then "the integer ${toString v}"
    else if isBool v then "the boolean ${if v then "true" else "false"}"
    else if v == null then "null"
    else if isList v then "an array"
    else if isAttrs v then "an object"
    else "a ${builtins.typeOf v}";
  showError = e: "field ${e.field}: ${e.message}";

  # The model's Pattern::new: not empty, and '*' only as the first or last character.
  patternError = p:
    let core = match "[*]?([^*]*)[*]?" p;
    in if p == "" then "a pattern must not be empty; use \"*\" to match every package"
    else if core == null then "pattern ${toJSON p} has a '*' in the middle; '*' may only start or end a pattern (e.g. \"python3*\", \"*-unwrapped\")"
    else null;

  # Errors of `value` at `path` against a `profileSchema` type; `partial` (profile settings)
  # requires no field, except inside list entries.
  schemaErrors = partial: path: type: value:
    let
      at = name: if path == "" then name else "${path}.${name}";
      err = message: [ { field = if path == "" then "(top level)" else path; inherit message; } ];
      bound = if type.max or null == null then "" else " (at most ${toString type.max})";
    in
    if type.kind == "string" then (if isString value then [ ] else err "expected a string, found ${describe value}")
    else if type.kind == "integer" then
      (if !(isInt value) then err "expected an unsigned integer${bound}, found ${describe value}"
       else if value < type.min then
         (if value >= 0 then err "must be at least ${toString type.min}, found ${toString value}"
          else err "expected an unsigned integer${bound}, found ${describe value}")
       else if type.max != null && value > type.max then err "expected an unsigned integer${bound}, found ${describe value}"
       else [ ])
    else if type.kind == "enum" then
      (if elem value type.values then [ ]
       else err "${if isString value then toJSON value else describe value} is not allowed; use ${concatStringsSep ", " (map toJSON type.values)}")
    else if type.kind == "nullOr" then (if value == null then [ ] else schemaErrors partial path type.of value)
    else if type.kind == "pattern" then
      (if !(isString value) then err "expected a string, found ${describe value}"
       else let e = patternError value; in if e == null then [ ] else err e)
    else if type.kind == "list" then
      (if !(isList value) then err "expected an array, found ${describe value}"
       else builtins.concatLists (genList (i: schemaErrors false "${path}[${toString i}]" type.of (builtins.elemAt value i)) (length value)))
    else if !(isAttrs value) then err "expected an object, found ${describe value}"
    else
      let
        names = attrNames type.fields;
        unknown = filter (n: !(elem n names)) (attrNames value);
        missing = if partial then [ ] else filter (n: !(value ? ${n}) && !(type.fields.${n}.optional or false)) names;
      in
      map (n: { field = at n; message = "unknown field; remove it or fix its spelling (expected one of ${concatStringsSep ", " names})"; }) unknown
      ++ map (n: { field = at n; message = "missing; add it (see docs/profile.md)"; }) missing
      ++ builtins.concatLists (map (n: schemaErrors partial (at n) type.fields.${n} value.${n}) (filter (n: value ? ${n}) names));

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
      The hardware profile schema (docs/profile.md) as data: the model crate's `Profile` as
      the modules and `profileErrors` check it. A type is `{ kind; optional ? false; … }`
      with kind `string`, `integer` (`min`, `max` or null), `enum` (`values`), `nullOr`
      (`of`), `list` (`of`), `pattern` (a rule's package-name pattern) or `object`
      (`fields`). tests/tests/nix_files.rs checks that it accepts and rejects what the model
      accepts and rejects.
    */
    profileSchema = schema;

    /**
      What is wrong with a profile attribute set, one `"field <path>: <what and how to fix>"`
      line per wrong field; `[ ]` when the hook accepts it. Checks every field against
      `profileSchema`, and each tier's `memoryMiB` against `build.memoryBudgetMiB`.
    */
    profileErrors = profile:
      let
        wrong = schemaErrors false "" self.profileSchema profile;
        build = profile.build or null;
        overBudget = filter (e: e != null) (map (tier:
          let mib = build.tiers.${tier}.memoryMiB;
          in if mib > build.memoryBudgetMiB then {
            field = "build.tiers.${tier}.memoryMiB";
            message = "${toString mib} exceeds build.memoryBudgetMiB (${toString build.memoryBudgetMiB}); lower it or raise the budget";
          } else null) [ "heavy" "medium" "light" ]);
      in
      map showError (if wrong != [ ] || build == null then wrong else overBudget);

    /**
      `profileErrors` for profile fields to be merged over a whole profile (the modules'
      `profileSettings`): each given field is checked, none is required, except inside list
      entries, which replace the profile's.
    */
    profileSettingsErrors = settings: map showError (schemaErrors true "" self.profileSchema settings);

    /**
      The option type of the modules' `profileSettings`, built with nixpkgs' `lib`: attribute
      sets merged as `attrsOf anything` merges them, then every field checked by
      `profileSettingsErrors`; an error names the option and the field.
    */
    profileSettingsType = lib:
      let base = lib.types.attrsOf lib.types.anything;
      in lib.mkOptionType {
        name = "nixTierProfileSettings";
        description = "hardware profile fields (docs/profile.md)";
        inherit (base) check;
        merge = loc: defs:
          let
            value = base.merge loc defs;
            errors = self.profileSettingsErrors value;
          in
          if errors == [ ] then value
          else throw "${lib.showOption loc}: ${concatStringsSep "; " errors}. Fix the setting (docs/profile.md).";
      };

    /**
      The profile the modules' options describe, checked: `profile` (a JSON file, or null)
      with `profileSettings` (attributes) merged over it; either alone is the whole profile.
      `option` (e.g. `"services.nix-tier"`) names the options in errors: a missing file, a
      file or merge that `profileErrors` finds wrong.
    */
    pinnedProfile = { option, profile, profileSettings }:
      let
        fromFile = builtins.addErrorContext "while reading ${option}.profile (${toString profile})"
          (self.profileFromJSON (readableProfile option profile));
        whole =
          if profile == null then profileSettings
          else if profileSettings == { } then fromFile
          else self.mergeProfile fromFile profileSettings;
        source =
          if profile == null then "${option}.profileSettings (without ${option}.profile it must be a whole profile: add the field, or set ${option}.profile to a file made by 'nix-tier profile')"
          else if profileSettings == { } then "${option}.profile (hardware profile ${toString profile})"
          else "${option}.profile (${toString profile}) with ${option}.profileSettings merged over it";
        errors = self.profileErrors whole;
      in
      if errors == [ ] then whole
      else throw "${source}: ${concatStringsSep "; " errors}. The hook would refuse this profile: fix it (docs/profile.md).";

    /**
      The file for the `hardware-profile` setting and `NIX_TIER_PROFILE` from the same
      arguments as `pinnedProfile`, in the store: the `profile` file copied there (as
      `hardware-profile.json`; a path already in the store is used as it is), or the merged
      profile written there as JSON. Checked as `pinnedProfile` checks it.
    */
    pinnedProfileFile = { option, profile, profileSettings }@args:
      builtins.seq (self.pinnedProfile args) (
        if profileSettings != { } then builtins.toFile "hardware-profile.json" (self.profileJSON (self.pinnedProfile args))
        else if builtins.hasContext (toString profile) then toString profile
        else builtins.path { path = readableProfile option profile; name = "hardware-profile.json"; });

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
      Whether the hook can talk to Nix `version`: everything that speaks the text hook protocol.
      Lix 2.94 (versions 2.90 and up are Lix's) replaced it with Cap'n Proto.
    */
    hookSupportsNix = version: !(atLeast version "2.94pre");

    /**
      Whether Nix `version` is 2.35.0 or 2.35.1 (a suffix such as `pre…` included): these wake
      the builds waiting for a `max-jobs` slot one per finished build and can lose wake-ups, up
      to a crash (`Assertion '!awake.empty()' failed`, NixOS/nix#16005 and #16321). Fixed in
      2.35.2. The modules warn about them, and so does the hook (hook/src/nix_version.rs).
    */
    nixLosesSlotWakeups = version: match "2[.]35[.][01]([^0-9].*)?" version != null;

    /**
      The warning the modules give for a Nix that `nixLosesSlotWakeups`; `option` names the
      setting (`"services.nix-tier"`).
    */
    slotWakeupsWarning = option: version:
      "${option}: Nix ${version} (nix.package) can lose the wake-ups of builds waiting for a max-jobs slot and then stop with \"Assertion '!awake.empty()' failed\" (NixOS/nix#16005, #16321). Upgrade to Nix 2.35.2 or later, or pin Nix 2.34 (nix.package = pkgs.nixVersions.nix_2_34).";

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
        (`pollInterval`, default 0: the hook decides in microseconds, so Nix may ask again at
        every wake-up of its worker, within milliseconds of a build ending and at least every
        second; a larger value starts a waiting build up to that many seconds late);
      - `profile` (path, string or attribute set): besides `hardware-profile`,
        `extra-system-features` (`gccarchFeaturesWith inferiors profile`, added to Nix's own
        defaults, `kvm` and `uid-range` included) when a plugin or a hook is given, and
        `max-jobs` (`maxJobs profile`) when a hook is given;
      - `inferiors`: nixpkgs' `lib.systems.architectures.inferiors`, for the named
        architectures below the CPU's (`haswell` under `skylake`); `{ }` lists only the CPU's
        own and its ISA levels;
      - `settings`: more settings, overriding these.
    */
    nixConfSettings =
      { plugin ? null
      , hook ? null
      , profile ? null
      , inferiors ? { }
      , pollInterval ? 0
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
          extra-system-features =
            if (hook == null && plugin == null) || data == null then null else self.gccarchFeaturesWith inferiors data;
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
