# nixos/modules/misc/assertions.nix (home-manager's modules/lib/assertions.nix has the same two
# options): a fixture for ./nixos.nix and ./home-manager.nix.
{ lib, ... }: {
  options = {
    assertions = lib.mkOption { type = lib.types.listOf lib.types.unspecified; default = [ ]; };
    warnings = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; };
  };
}
