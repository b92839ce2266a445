# overlays.default: nix-tier's packages in nixpkgs. The plugin is built against `final.nix`;
# for another Nix use `nix-tier-plugin.override { nix = thatNix; }`.
final: prev: {
  nix-tier = final.callPackage ./nix-tier.nix { };
  nix-tier-plugin = final.callPackage ./package.nix { };
}
