# home-manager module: programs.nix-tier. The user guide is docs/guide.md; every option is
# listed in docs/reference.md (generated from the declarations below by scripts/gen-reference).
#
# It configures the user's own Nix through home-manager's nix.settings, which becomes
# ~/.config/nix/nix.conf: the plugin and the pinned profile for the user's evaluations
# (nix-instantiate, nix build, home-manager switch evaluate in the user's process, so
# plugin-files and hardware-profile take effect there). Builds, however, are run by the
# nix-daemon, which reads only /etc/nix/nix.conf and its own command line: the build hook, its
# cgroups and max-jobs are system settings (the NixOS module services.nix-tier, or the nix.conf
# lines of docs/guide.md on other distributions). `hook.enable` exists for single-user
# installations, where the user's Nix runs builds itself.
{ config, lib, pkgs, ... }:

let
  tier = import ./lib.nix;
  inherit (lib) mkOption mkEnableOption mkIf mkMerge types literalExpression optional optionalAttrs;

  cfg = config.programs.nix-tier;
  nixPackage = config.nix.package;
  nixVersion = if nixPackage == null then null else lib.getVersion nixPackage;

  hasProfile = cfg.profile != null || cfg.profileSettings != { };
  # Checked as the hook checks it, also when only `nix-tier` reads it (NIX_TIER_PROFILE).
  pinned = { option = "programs.nix-tier"; inherit (cfg) profile profileSettings; };
  profile = tier.pinnedProfile pinned;
  profileFile = tier.pinnedProfileFile pinned;
  # nixpkgs' table of the architectures each gcc.arch can run (haswell, broadwell under skylake).
  inferiors = lib.systems.architectures.inferiors or { };
in
{
  options.programs.nix-tier = {
    enable = mkEnableOption "nix-tier for your own Nix: the plugin and a pinned hardware profile in ~/.config/nix/nix.conf, and the nix-tier command";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./nix-tier.nix { };
      defaultText = literalExpression "pkgs.callPackage <nix-tier>/nix/nix-tier.nix { }";
      description = "The nix-tier package; its `nix-tier` command is added to home.packages.";
    };

    profile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression "./hardware-profile.json";
      description = ''
        The pinned hardware profile: a JSON file you commit with your configuration, made by
        `nix-tier profile > hardware-profile.json` (docs/profile.md). It is copied to the store
        and named by `hardware-profile` in ~/.config/nix/nix.conf, so `builtins.hardwareProfile`
        and `builtins.optimizeFor` read it, also in pure evaluation (flakes), and by
        `NIX_TIER_PROFILE` for the `nix-tier` command. A string is copied to the store as
        well (reading it needs impure evaluation). A missing file or a profile the hook would
        refuse fails the evaluation, naming this option.
      '';
    };

    profileSettings = mkOption {
      type = tier.profileSettingsType lib;
      default = { };
      example = literalExpression ''{ build.tiers.heavy.cores = 7; }'';
      description = ''
        Profile fields written in Nix, merged over `profile` (attribute sets recursively, lists
        replaced); without `profile` they must form a whole profile. The result is written to
        the store as JSON and used as `profile` would be. Every field is checked against the
        profile schema (docs/profile.md).
      '';
    };

    plugin = {
      enable = mkOption {
        type = types.bool;
        default = nixPackage != null && tier.pluginSupportsNix nixVersion;
        defaultText = lib.literalMD "`true` when `config.nix.package` is set and a Nix the plugin supports (2.8, or 2.24 and later; not Lix)";
        description = ''
          Whether to load the plugin into your Nix (`plugin-files` in ~/.config/nix/nix.conf),
          with `hardware-profile` naming the pinned profile and `extra-system-features` the
          profile's `gccarch-*` features (its `gcc.arch`, nixpkgs' inferior architectures of it,
          its ISA levels), without which Nix refuses the builds `builtins.optimizeFor` makes. A
          nix-daemon takes these features from untrusted users only through /etc/nix/nix.conf. It is built against
          `nix.package`, which must be the Nix you run (`nix --version`): a plugin only loads
          into the exact Nix it was built for. The compat header supports Nix 2.8 and Nix 2.24
          onwards (not Lix).
        '';
      };

      package = mkOption {
        type = types.package;
        default = pkgs.callPackage ./package.nix { nix = config.nix.package; };
        defaultText = literalExpression "pkgs.callPackage <nix-tier>/nix/package.nix { nix = config.nix.package; }";
        description = "The plugin, built against `config.nix.package`; `plugin-files` names its loader, which loads the build only into that Nix and otherwise warns once.";
      };
    };

    hook = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Single-user Nix only (no nix-daemon: your own Nix process runs the builds). Sets
          `build-hook`, `build-poll-interval` and `max-jobs` in ~/.config/nix/nix.conf (the
          profile's `gccarch-*` features are set whenever the plugin or the hook is). With a nix-daemon
          (multi-user installations, NixOS) these are system settings: the daemon runs the
          hook and reads only /etc/nix/nix.conf, so set them there, with the NixOS module's
          services.nix-tier or as docs/guide.md shows for other distributions.
        '';
      };
    };

    pollInterval = mkOption {
      type = types.ints.unsigned;
      default = 0;
      description = ''
        `build-poll-interval` in seconds, with `hook.enable`: how long Nix waits before asking
        the hook again about a postponed build. With 0, Nix asks again at every wake-up of
        its worker (within milliseconds of a build ending, at least every second when idle),
        which costs little because the hook decides in microseconds. A larger value starts a
        waiting build up to that many seconds late.
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = !cfg.plugin.enable || nixPackage != null;
          message = "programs.nix-tier.plugin.enable: set nix.package to the Nix you run (e.g. pkgs.nix, or osConfig.nix.package): the plugin is built against it.";
        }
        {
          assertion = !cfg.plugin.enable || nixPackage == null || tier.pluginSupportsNix nixVersion;
          message = "programs.nix-tier.plugin.enable: the plugin cannot be built for Nix ${toString nixVersion} (nix.package); cpp-shim/nix-compat.hh supports Nix 2.8 and Nix 2.24 onwards, not Lix.";
        }
        {
          assertion = !cfg.hook.enable || nixPackage == null || tier.hookSupportsNix nixVersion;
          message = "programs.nix-tier.hook.enable: nix.package is version ${toString nixVersion}, a Lix 2.94 or later, which no longer speaks the text build hook protocol nix-tier-hook implements. Set programs.nix-tier.hook.enable = false.";
        }
      ];
      warnings = optional (nixPackage != null && tier.nixLosesSlotWakeups nixVersion) (tier.slotWakeupsWarning "programs.nix-tier" nixVersion);
      home.packages = [ cfg.package ];
      home.sessionVariables = optionalAttrs hasProfile { NIX_TIER_PROFILE = profileFile; };
    }

    (mkIf cfg.plugin.enable {
      nix.settings = { plugin-files = [ (tier.pluginFile cfg.plugin.package) ]; }
        // optionalAttrs hasProfile { hardware-profile = profileFile; };
    })

    # Builds optimised for the profile's CPU require its gccarch-* features, with or without the hook.
    (mkIf ((cfg.plugin.enable || cfg.hook.enable) && hasProfile) {
      nix.settings.extra-system-features = tier.gccarchFeaturesWith inferiors profile;
    })

    (mkIf cfg.hook.enable {
      nix.settings = {
        build-hook = tier.hookFile cfg.package;
        build-poll-interval = cfg.pollInterval;
      } // optionalAttrs hasProfile {
        max-jobs = tier.maxJobs profile;
      };
    })
  ]);
}
