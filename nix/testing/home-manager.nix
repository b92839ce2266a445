# Stand-ins for the home-manager modules nix-tier's home-manager module meets, for
# ./eval-module.nix, with home-manager's types. Each part names the home-manager file it mirrors.
let
  homeModule =
    # modules/home-environment.nix: home.packages, home.sessionVariables
    { lib, ... }: with lib; {
      options.home = {
        packages = mkOption { type = types.listOf types.package; default = [ ]; };
        sessionVariables = mkOption { type = types.attrsOf (types.either types.int types.str); default = { }; };
      };
    };

  nixModule =
    # modules/misc/nix/default.nix: nix.enable (hidden, default true), nix.package (null by
    # default), nix.settings (a freeform submodule); ~/.config/nix/nix.conf written from the
    # settings, which need nix.package (an assertion says so).
    { config, lib, pkgs, ... }: with lib;
    let
      cfg = config.nix;
      atom = types.nullOr (types.oneOf [ types.bool types.int types.float types.str types.path types.package ]);
      value = v: if v == null then "" else if builtins.isBool v then boolToString v else toString v;
    in
    {
      options.nix = {
        enable = mkOption { type = types.bool; default = true; };
        package = mkOption { type = types.nullOr types.package; default = null; };
        settings = mkOption {
          type = types.submodule { freeformType = types.attrsOf (types.either atom (types.listOf atom)); };
          default = { };
        };
      };
      options.xdg.configFile = mkOption {
        type = types.attrsOf (types.submodule { options.source = mkOption { type = types.path; }; });
        default = { };
      };
      config = mkIf (cfg.enable && cfg.settings != { }) {
        assertions = [ { assertion = cfg.package != null; message = "A corresponding Nix package must be specified via `nix.package` for generating nix.conf."; } ];
        xdg.configFile."nix/nix.conf".source = pkgs.writeText "nix.conf"
          (concatStringsSep "\n" (mapAttrsToList (name: v: "${name} = ${value v}") cfg.settings) + "\n");
      };
    };
in
[ ./assertions.nix homeModule nixModule ]
