# Stand-ins for the NixOS modules nix-tier's NixOS module meets, for ./eval-module.nix: the
# options it defines or reads, with nixpkgs' types (so definitions merge as in NixOS), and what
# nixpkgs itself defines there. Each part names the nixpkgs file it mirrors.
#
# nixpkgs from 2026-02 (NixOS/nixpkgs#491809) declares nix.daemonUser and, for a user other than
# root, replaces the daemon's ExecStart with its own line through a user-namespace wrapper (an
# empty entry clearing the packaged unit's line, then its own). Before that, nix.daemonUser does
# not exist: the previous form of nix-daemon.nix is this fixture with `daemonUserOption = false`.
{ daemonUserOption ? true }:
let
  environmentModule =
    # nixos/modules/config/system-path.nix (systemPackages), shells-environment.nix (variables),
    # system/etc/etc.nix (etc: source or text)
    { lib, ... }: with lib; {
      options.environment = {
        systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
        variables = mkOption { type = types.attrsOf (types.either types.str types.path); default = { }; };
        etc = mkOption {
          type = types.attrsOf (types.submodule {
            options = {
              source = mkOption { type = types.path; };
              text = mkOption { type = types.nullOr types.lines; default = null; };
            };
          });
          default = { };
        };
      };
    };

  systemdModule =
    # nixos/lib/systemd-unit-options.nix and nixos/lib/systemd-types.nix: a service's
    # `environment` values merge only when equal; `serviceConfig` values are `unitOption`, whose
    # lists (ExecStart = [ "" "…" ]) concatenate across definitions; `description` is one
    # string, `wantedBy` and `before` are lists of unit names.
    { lib, ... }: with lib;
    let
      unitOption = mkOptionType {
        name = "systemd option";
        check = v: builtins.isBool v || builtins.isInt v || builtins.isString v || builtins.isList v || isStringLike v;
        merge = loc: defs:
          if builtins.any (d: builtins.isList d.value) defs
          then builtins.concatLists (map (d: if builtins.isList d.value then d.value else [ d.value ]) defs)
          else mergeEqualOption loc defs;
      };
    in
    {
      options.systemd = {
        packages = mkOption { type = types.listOf types.package; default = [ ]; };
        tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
        services = mkOption {
          type = types.attrsOf (types.submodule {
            options = {
              environment = mkOption { type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ])); default = { }; };
              serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
              path = mkOption { type = types.listOf types.package; default = [ ]; };
              description = mkOption { type = types.str; default = ""; };
              wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
              before = mkOption { type = types.listOf types.str; default = [ ]; };
            };
          });
          default = { };
        };
      };
    };

  nixDaemonModule =
    # nixos/modules/services/system/nix-daemon.nix: nix.enable, nix.package, the unit from the
    # Nix package (systemd.packages), the daemon's environment and, in the current form, the
    # unprivileged daemon's ExecStart.
    { config, lib, pkgs, ... }: with lib;
    let cfg = config.nix;
    in {
      options.nix = {
        enable = mkOption { type = types.bool; default = true; };
        package = mkOption { type = types.package; default = pkgs.nix; };
      } // optionalAttrs daemonUserOption {
        daemonUser = mkOption { type = types.str; default = "root"; };
      };
      config = mkIf cfg.enable {
        environment.systemPackages = [ cfg.package ];
        systemd.packages = [ cfg.package ];
        systemd.services.nix-daemon = {
          path = [ cfg.package ];
          environment.CURL_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt";
          serviceConfig = {
            LimitNOFILE = 1048576;
          } // optionalAttrs (daemonUserOption && cfg.daemonUser != "root") {
            User = cfg.daemonUser;
            ExecStart = [ "" "${pkgs.nix-daemon-nswrapper} ${cfg.package}/bin/nix-daemon --daemon" ];
          };
        };
      };
    };

  nixConfModule =
    # nixos/modules/config/nix.nix: nix.settings (a freeform submodule with max-jobs and
    # system-features declared), and /etc/nix/nix.conf written from it: `name = value` lines,
    # extra-* settings last; lists space-separated, booleans true/false, paths and packages as
    # toString gives them.
    { config, lib, pkgs, ... }: with lib;
    let
      cfg = config.nix;
      atom = types.nullOr (types.oneOf [ types.bool types.int types.float types.str types.path types.package ]);
      value = v:
        if v == null then ""
        else if builtins.isBool v then boolToString v
        else if builtins.isList v then toString v
        else toString v;
      lines = settings: concatStringsSep "\n" (mapAttrsToList (name: v: "${name} = ${value v}") settings);
      isExtra = name: hasPrefix "extra-" name;
    in
    {
      options.nix.settings = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf (types.either atom (types.listOf atom));
          options = {
            max-jobs = mkOption { type = types.either types.int (types.enum [ "auto" ]); default = "auto"; };
            system-features = mkOption { type = types.listOf types.str; };
          };
        };
        default = { };
      };
      config = mkIf cfg.enable {
        environment.etc."nix/nix.conf".source = pkgs.writeText "nix.conf" ''
          ${lines (filterAttrs (n: _: !(isExtra n)) cfg.settings)}
          ${lines (filterAttrs (n: _: isExtra n) cfg.settings)}
        '';
        nix.settings.system-features = mkDefault [ "nixos-test" "benchmark" "big-parallel" "kvm" ];
      };
    };
in
[ ./assertions.nix environmentModule systemdModule nixDaemonModule nixConfModule ]
