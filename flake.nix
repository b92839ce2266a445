{
  description = "nix-tier: hardware-aware Nix builds (plugin, build hook, NixOS and home-manager modules)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: builtins.listToAttrs (map
        (system: { name = system; value = f system nixpkgs.legacyPackages.${system}; })
        systems);
    in
    {
      # Pure functions of a hardware profile (nix/lib.nix): usable without nixpkgs, e.g.
      # nixpkgs.hostPlatform = nix-tier.lib.hostPlatform (nix-tier.lib.profileFromJSON ./hw.json);
      lib = import ./nix/lib.nix;

      overlays.default = import ./nix/overlay.nix;

      nixosModules.default = ./nix/nixos-module.nix;
      nixosModules.nix-tier = ./nix/nixos-module.nix;
      homeManagerModules.default = ./nix/home-manager-module.nix;
      homeManagerModules.nix-tier = ./nix/home-manager-module.nix;

      packages = forAllSystems (system: pkgs: rec {
        # The command line and the build hook; any Nix.
        nix-tier = pkgs.callPackage ./nix/nix-tier.nix { };
        # The plugin, built against nixpkgs' `nix` (2.24 or later, or 2.8; not Lix; see
        # cpp-shim/nix-compat.hh): `nix-tier-plugin.override { nix = yourNix; }` for another.
        # plugin-files names its loader, lib/libnix_tier_loader.so (passthru.pluginFile).
        nix-tier-plugin = pkgs.callPackage ./nix/package.nix { };
        default = nix-tier;
      });

      checks = forAllSystems (system: pkgs: {
        # The workspace's tests that run inside the build sandbox (see nix/nix-tier.nix).
        tests = pkgs.callPackage ./nix/nix-tier.nix { runTests = true; };

        # Every .nix file parses, and nix/lib.nix passes its own checks
        # (nix/testing/lib-checks.nix), with the Nix of this nixpkgs.
        nix-files = pkgs.runCommand "nix-tier-nix-files" { nativeBuildInputs = [ pkgs.nix ]; } ''
          export NIX_STATE_DIR=$TMPDIR/state NIX_STORE_DIR=$TMPDIR/store NIX_LOG_DIR=$TMPDIR/log NIX_CONF_DIR=$TMPDIR
          cd ${./.}
          find . -name '*.nix' -print0 | xargs -0 -n 1 nix-instantiate --parse > /dev/null
          nix-instantiate --eval --strict --json nix/testing/lib-checks.nix -A failures > $TMPDIR/failures
          if [ "$(cat $TMPDIR/failures)" != "[]" ]; then cat $TMPDIR/failures; exit 1; fi
          touch $out
        '';

        # The plugin loaded into the Nix it was built for: the pinned profile comes back, and
        # optimizeFor targets its CPU in nixpkgs' own hello. (The example profile is x86_64's.)
        ${if system == "x86_64-linux" then "plugin" else null} =
          let plugin = self.packages.${system}.nix-tier-plugin;
          in pkgs.runCommand "nix-tier-plugin-check" { nativeBuildInputs = [ plugin.nix ]; } ''
            export NIX_STATE_DIR=$TMPDIR/state NIX_STORE_DIR=$TMPDIR/store NIX_LOG_DIR=$TMPDIR/log NIX_CONF_DIR=$TMPDIR
            eval() {
              nix-instantiate --eval --strict --json \
                --option plugin-files ${plugin}/${plugin.pluginFile} \
                --option hardware-profile ${./nix/examples/skylake.json} -E "$1"
            }
            [ "$(eval 'builtins.hardwareProfile.cpu.gcc.arch')" = '"skylake"' ]
            [ "$(eval '(builtins.optimizeFor { } (import ${pkgs.path} { system = "${system}"; }).hello).nixTier.target')" = '"skylake"' ]
            touch $out
          '';

        # The NixOS module inside a real NixOS evaluation: the nix.conf it generates passes
        # NixOS's own check (`nix show-config`, unknown settings are errors), and the daemon
        # unit gets the hook's environment and the cgroup delegation.
        nixos-module =
          let
            nixos = nixpkgs.lib.nixosSystem {
              inherit system;
              modules = [
                self.nixosModules.default
                {
                  boot.isContainer = true;
                  system.stateVersion = "25.05";
                  services.nix-tier = {
                    enable = true;
                    profile = ./nix/examples/skylake.json;
                  };
                }
              ];
            };
            inherit (nixos.config.systemd.services.nix-daemon) environment serviceConfig;
            nixConf = nixos.config.environment.etc."nix/nix.conf".source;
          in
          assert environment.NIX_TIER_STATE_DIR == "/var/lib/nix-tier";
          assert environment.NIX_TIER_CGROUP_ROOT == "/sys/fs/cgroup/system.slice/nix-daemon.service";
          assert serviceConfig.Delegate == "yes" && serviceConfig.DelegateSubgroup == "supervisor";
          pkgs.runCommand "nix-tier-nixos-module" { } ''
            grep -q '^plugin-files = .*/lib/libnix_tier_loader.so$' ${nixConf}
            grep -q '^hardware-profile = .*hardware-profile.json$' ${nixConf}
            grep -q '^build-hook = .*/bin/nix-tier-hook$' ${nixConf}
            grep -q '^max-jobs = 12$' ${nixConf}
            grep -q '^system-features = .*gccarch-skylake.*gccarch-x86-64-v3' ${nixConf}
            cp ${nixConf} $out
          '';
      });
    };
}
