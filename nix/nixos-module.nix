# NixOS module: services.nix-tier. The user guide is docs/guide.md; every option is listed in
# docs/reference.md (generated from the declarations below by scripts/gen-reference).
#
# What it configures, and why each piece lives where it does:
# - /etc/nix/nix.conf (nix.settings): the plugin (plugin-files, hardware-profile), the build
#   hook (build-hook, build-poll-interval, max-jobs) and the profile's gccarch-* system features;
# - nix-daemon.service: the hook runs as a child of the daemon's workers and inherits their
#   environment, so NIX_TIER_STATE_DIR, NIX_TIER_PROFILE and NIX_TIER_CGROUP_ROOT are set there;
#   the cgroup delegation (below); and `NIX_CONFIG = "build-hook = …"`, because Nix 2.25 to 2.33
#   lose build-hook from /etc/nix/nix.conf (NIX_CONFIG, read after it, keeps it; fixed in 2.34).
#   The environment, unlike an ExecStart override, leaves the daemon's command line to nixpkgs,
#   which replaces it itself for an unprivileged daemon (nix.daemonUser);
# - nix-tier-broker.service: `nix-tier-hook --broker --stay`, the machine's lease table, which
#   every hook talks to over `<state dir>/broker.sock`. A hook starts it on demand when it is not
#   running; the service keeps one running from boot, as root (it makes the builds' cgroups),
#   with the environment the daemon gives the hook;
# - the system environment: the nix-tier command, and the same variables for `nix-tier status`.
#
# With nix.enable = false there is no daemon and no nix.conf to configure: an assertion says so
# and nothing else is set.
#
# Cgroups (cgroup v2). The hook bounds every admitted build with its own cgroup. cgroup v2's
# "no internal processes" rule lets a cgroup hand memory and CPU controllers to children only
# while it holds no process itself, and nix-daemon.service's cgroup holds the daemon. So the
# unit is delegated (Delegate=yes: the subtree belongs to the daemon, systemd leaves it alone)
# with DelegateSubgroup=supervisor (systemd >= 254): systemd starts the daemon in
# nix-daemon.service/supervisor, which leaves nix-daemon.service empty. The hook then creates
# its sibling nix-daemon.service/nix-tier, enables memory and cpu for it, and puts each build
# in nix-daemon.service/nix-tier/<build>:
#
#   system.slice/nix-daemon.service/        Delegate=yes; no process of its own
#   ├── supervisor/                         the daemon, its workers, the hook, builders at first
#   └── nix-tier/                           NIX_TIER_CGROUP_ROOT/nix-tier, made by the hook
#       └── <build>/                        memory.max = reservation, cpu.max = tier's cores
{ config, lib, pkgs, ... }:

let
  tier = import ./lib.nix;
  inherit (lib) mkOption mkEnableOption mkIf mkMerge mkDefault types literalExpression optional optionalAttrs;

  cfg = config.services.nix-tier;
  nixPackage = config.nix.package;
  nixVersion = lib.getVersion nixPackage;

  hasProfile = cfg.profile != null || cfg.profileSettings != { };
  # The pinned profile as an attribute set (read at evaluation time: max-jobs and the gccarch
  # features come from it) and as a file in the store, both checked as the hook checks them.
  pinned = { option = "services.nix-tier"; inherit (cfg) profile profileSettings; };
  profile = tier.pinnedProfile pinned;
  profileFile = tier.pinnedProfileFile pinned;

  hookProgram = tier.hookFile cfg.package;
  hookWorks = tier.hookSupportsNix nixVersion;
  tierEnvironment = { NIX_TIER_STATE_DIR = cfg.stateDirectory; } // optionalAttrs hasProfile { NIX_TIER_PROFILE = profileFile; };
  cgroupEnvironment = { NIX_TIER_CGROUP_ROOT = cfg.cgroups.root; };
  # The user Nix's daemon, and so its hooks, run as: root, or nix.daemonUser where nixpkgs has
  # it (2026-02 on). The state directory and the broker are that user's: the hooks write the one
  # and talk to the other, which accepts only its own user and root.
  daemonUser = config.nix.daemonUser or "root";
  # nixpkgs' table of the architectures each gcc.arch can run (haswell, broadwell under skylake).
  inferiors = lib.systems.architectures.inferiors or { };
in
{
  options.services.nix-tier = {
    enable = mkEnableOption "nix-tier: hardware-aware Nix builds (plugin, build hook, build cgroups, pinned hardware profile)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./nix-tier.nix { };
      defaultText = literalExpression "pkgs.callPackage <nix-tier>/nix/nix-tier.nix { }";
      description = ''
        The nix-tier package: the `nix-tier` command (installed system-wide) and the build hook
        `nix-tier-hook`.
      '';
    };

    profile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression "./hardware-profile.json";
      description = ''
        The pinned hardware profile: a JSON file you commit with your configuration, made by
        `nix-tier profile > hardware-profile.json` on the machine and edited as you like
        (docs/profile.md). It is copied to the store and named by `hardware-profile` in nix.conf
        (so the plugin reads it, also in pure evaluation), `NIX_TIER_PROFILE` (for the hook and
        `nix-tier`) and /etc/nix/hardware-profile.json. It is also read at evaluation time for
        `max-jobs` and the `gccarch-*` system features, and checked as the hook checks it: a
        missing file or a profile the hook would refuse fails the evaluation, naming this
        option. A string (`"/etc/nixos/hardware-profile.json"`) is copied to the store as well;
        reading it needs impure evaluation, so prefer a path in flakes.

        With neither this nor `profileSettings`, nothing is pinned: the hook and `nix-tier`
        detect the host, and `builtins.hardwareProfile` works only in impure evaluation.
      '';
    };

    profileSettings = mkOption {
      type = tier.profileSettingsType lib;
      default = { };
      example = literalExpression ''
        {
          build.rules = [ { match = "nodejs*"; tier = "heavy"; } ];
          build.tiers.heavy = { maxJobs = 1; cores = 7; memoryMiB = 14336; };
        }
      '';
      description = ''
        Profile fields written in Nix. Merged over `profile` (attribute sets recursively, lists
        replaced) when that is set; otherwise they must form a whole profile. The result is
        written to the store as JSON and used as `profile` would be. Every field is checked
        against the profile schema (docs/profile.md), and the merged profile as the hook
        checks it: a profile the hook would refuse fails the evaluation, naming the field.
      '';
    };

    plugin = {
      enable = mkOption {
        type = types.bool;
        default = tier.pluginSupportsNix nixVersion;
        defaultText = lib.literalMD "`true` when `config.nix.package` is a Nix the plugin supports (2.8, or 2.24 and later; not Lix)";
        description = ''
          Whether to load the plugin (`builtins.hardwareProfile`, `builtins.optimizeFor`) into
          the system's Nix through `plugin-files`, with `hardware-profile` naming the pinned
          profile. The plugin is C++ built against one exact Nix version, and its compat
          header (cpp-shim/nix-compat.hh) supports Nix 2.8 and Nix 2.24 onwards, not Lix: with
          another `nix.package` the default is `false`, and `true` is refused by an assertion. The hook,
          cgroups and system features do not need the plugin.
        '';
      };

      package = mkOption {
        type = types.package;
        default = pkgs.callPackage ./package.nix { nix = config.nix.package; };
        defaultText = literalExpression "pkgs.callPackage <nix-tier>/nix/package.nix { nix = config.nix.package; }";
        description = ''
          The plugin, built against `config.nix.package`: the Nix that loads it must be the
          Nix it was built with. `plugin-files` names its loader (`lib/libnix_tier_loader.so`),
          which loads the build only into that Nix and otherwise warns once.
        '';
      };
    };

    hook = {
      enable = mkOption {
        type = types.bool;
        default = hookWorks;
        defaultText = lib.literalMD "`true`, unless `config.nix.package` is Lix 2.94 or later";
        description = ''
          Whether the daemon's builds go through the build hook `nix-tier-hook`, which admits
          each build only while its tier has a free slot and its memory fits the budget, bounds
          it with a cgroup, and learns packages' memory from their past builds
          (docs/hook.md, docs/enforcement.md). Sets `build-hook`, `build-poll-interval` and,
          with a pinned profile, `max-jobs` (as a default) to the largest tier `maxJobs`;
          `build-hook` goes to the daemon's environment as `NIX_CONFIG` too, because Nix 2.25
          to 2.33 lose it from /etc/nix/nix.conf. Adds the service `nix-tier-broker`
          (`nix-tier-hook --broker --stay`, as root), which keeps the machine's lease table
          the hooks ask; without it the first hook starts one. Remote builders
          (`nix.buildMachines`) keep working: the hook hands them what Nix's own build-remote
          accepts.

          Lix 2.94 and later replaced the build hook protocol the hook speaks: there the
          default is `false`, and what works is the pinned profile (for `nix-tier`) and the
          `gccarch-*` system features.
        '';
      };
    };

    pollInterval = mkOption {
      type = types.ints.unsigned;
      default = 0;
      description = ''
        `build-poll-interval`, in seconds: how long Nix waits before asking the hook again
        about a build it postponed (Nix's default is 5). With 0, Nix asks again at every
        wake-up of its worker: within milliseconds of a build ending in the same Nix process,
        and at least every second when idle. The hook decides in microseconds, so the extra
        requests cost next to nothing. A larger value saves them but starts a waiting build
        up to that many seconds late.
      '';
    };

    stateDirectory = mkOption {
      type = types.str;
      default = "/var/lib/nix-tier";
      description = ''
        The runtime's state (the broker's socket and lock, its snapshot of running and
        waiting builds, the build history history.sqlite), as `NIX_TIER_STATE_DIR` for the
        daemon, the `nix-tier-broker` service and `nix-tier` in users' shells. Created mode
        0700, owned by the user the daemon runs as (root, or `nix.daemonUser`), as the broker
        is: run `sudo nix-tier status` to read it.
      '';
    };

    gccarchFeatures = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether to set `system-features` to NixOS's defaults plus the pinned profile's
        `gccarch-*` features: the CPU's own `gcc.arch`, what nixpkgs lists as its inferior
        architectures, and every x86-64 (or Arm) ISA level up to the profile's `isaLevel`.
        Derivations built for a CPU (`builtins.optimizeFor`, `nixpkgs.hostPlatform.gcc.arch`)
        require `gccarch-<arch>`; without the feature Nix refuses to build them.
      '';
    };

    cgroups = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Whether the hook bounds each build with a cgroup (memory limit = its reservation,
          CPU quota = its tier's cores; cgroup v2). Delegates nix-daemon.service's cgroup
          (`Delegate=yes`) with the daemon in the `supervisor` subgroup
          (`DelegateSubgroup=supervisor`, systemd 254 or later), and points
          `NIX_TIER_CGROUP_ROOT` at the delegated cgroup: the hook's builds go in its
          `nix-tier` child, beside `supervisor`. Do not combine with Nix's own `use-cgroups`.
          Without cgroups builds are still admitted by tier, but not bounded.
        '';
      };

      root = mkOption {
        type = types.str;
        default = "/sys/fs/cgroup/system.slice/nix-daemon.service";
        description = ''
          The delegated cgroup v2 directory of nix-daemon.service (`NIX_TIER_CGROUP_ROOT`).
          Change it only if the unit runs in another slice.
        '';
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = config.nix.enable;
          message = "services.nix-tier.enable: nix.enable is false, so there is no nix-daemon and no /etc/nix/nix.conf for nix-tier to configure. Set nix.enable = true, or services.nix-tier.enable = false.";
        }
        {
          assertion = !cfg.plugin.enable || tier.pluginSupportsNix nixVersion;
          message = "services.nix-tier.plugin.enable: the plugin cannot be built for Nix ${nixVersion} (config.nix.package); cpp-shim/nix-compat.hh supports Nix 2.8 and Nix 2.24 onwards, not Lix. Set services.nix-tier.plugin.enable = false.";
        }
        {
          assertion = !cfg.hook.enable || hookWorks;
          message = "services.nix-tier.hook.enable: config.nix.package is version ${nixVersion}, a Lix 2.94 or later, which no longer speaks the text build hook protocol nix-tier-hook implements. Remove services.nix-tier.hook.enable = true: on this Lix nix-tier gives the pinned profile and the gccarch-* system features.";
        }
      ];
    }

    (mkIf config.nix.enable (mkMerge [
      {
        warnings = optional (!hasProfile)
          "services.nix-tier: no profile pinned (services.nix-tier.profile or profileSettings): the hook detects the host, no gccarch-* features or max-jobs are set, and builtins.hardwareProfile fails in pure evaluation (flakes)."
          ++ optional (!hookWorks)
          "services.nix-tier: config.nix.package is Lix ${nixVersion}, which replaced the build hook protocol nix-tier-hook speaks (Lix 2.94), and the plugin is not built for Lix: builds are not admitted by tier or bounded by cgroups. What works: the pinned profile (nix-tier, NIX_TIER_PROFILE, /etc/nix/hardware-profile.json) and the gccarch-* system features."
          ++ optional (tier.nixLosesSlotWakeups nixVersion) (tier.slotWakeupsWarning "services.nix-tier" nixVersion);

        environment.systemPackages = [ cfg.package ];
        environment.variables = tierEnvironment;
        environment.etc."nix/hardware-profile.json" = mkIf hasProfile { source = profileFile; };

        systemd.tmpfiles.rules = [ "d ${cfg.stateDirectory} 0700 ${daemonUser} - - -" ];
        systemd.services.nix-daemon.environment = tierEnvironment;

        nix.settings = mkIf (hasProfile && cfg.gccarchFeatures) {
          system-features = tier.defaultSystemFeatures ++ tier.gccarchFeaturesWith inferiors profile;
        };
      }

      (mkIf cfg.plugin.enable {
        nix.settings = { plugin-files = [ (tier.pluginFile cfg.plugin.package) ]; }
          // optionalAttrs hasProfile { hardware-profile = profileFile; };
      })

      (mkIf cfg.hook.enable {
        nix.settings = {
          build-hook = hookProgram;
          build-poll-interval = cfg.pollInterval;
        } // optionalAttrs hasProfile { max-jobs = mkDefault (tier.maxJobs profile); };
        # Nix 2.25 to 2.33 reset build-hook after reading /etc/nix/nix.conf but honour
        # NIX_CONFIG (fixed in 2.34 by NixOS/nix#15083; tests/tests/nix_files.rs runs Nix 2.26).
        systemd.services.nix-daemon.environment.NIX_CONFIG = "build-hook = ${hookProgram}";
        # Started with the daemon (and at boot), before it, so the first hook finds the broker
        # running; a hook still starts one itself if this one is down.
        systemd.services.nix-tier-broker = {
          description = "nix-tier build admission broker";
          wantedBy = [ "multi-user.target" "nix-daemon.service" ];
          before = [ "nix-daemon.service" ];
          environment = tierEnvironment // optionalAttrs cfg.cgroups.enable cgroupEnvironment;
          serviceConfig = {
            ExecStart = "${hookProgram} --broker --stay";
            Restart = "always";
            RestartSec = "1s";
          } // optionalAttrs (daemonUser != "root") { User = daemonUser; };
        };
      })

      (mkIf (cfg.hook.enable && cfg.cgroups.enable) {
        systemd.services.nix-daemon.serviceConfig = {
          Delegate = "yes";
          DelegateSubgroup = "supervisor";
        };
        systemd.services.nix-daemon.environment = cgroupEnvironment;
        warnings = optional (config.nix.settings.use-cgroups or false)
          "services.nix-tier.cgroups: nix.settings.use-cgroups is on as well; Nix would move builds into its own nix-build-uid-* cgroups and the hook into its own: keep one of them.";
      })
    ]))
  ]);
}
