# The repository's sources for the package builds: everything but build outputs, VCS data and
# `nix build` result links, so that a checkout with a populated target/ does not end up in
# the store (inside a flake the source is already git's tracked files only).
let
  root = ./..;
  rootString = toString root;
  excluded = [ "target" "target-model" "build" ".git" ".direnv" ];
in
builtins.path {
  path = root;
  name = "nix-tier-source";
  filter = path: type:
    let
      base = baseNameOf path;
      topLevel = dirOf path == rootString;
    in
    !(topLevel && builtins.elem base excluded) && builtins.match "result(-.*)?" base == null;
}
