# A small DAG shaped like a home-manager rebuild: two heavy runtimes, three medium libraries with
# a light tool on each, and the light environment on top. Builders are /bin/sh scripts that sleep and hold memory (`head -c` piped
# into `tail` keeps the bytes resident), so the demo needs no nixpkgs.
{ system ? builtins.currentSystem }:
let
  build = { name, tier, seconds, mib, deps ? [ ] }: derivation {
    inherit name system;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    NIX_TIER = tier;
    inherit deps;
    args = [ "-c" ''
      head -c ${toString mib}M /dev/zero | tail -c ${toString mib}M > /dev/null &
      sleep ${toString seconds}
      wait
      echo ${name} > $out
    '' ];
  };
  runtimes = map (n: build { name = "runtime-${n}-1.0"; tier = "heavy"; seconds = 4; mib = 300; }) [ "node" "python" ];
  libs = map (n: build { name = "lib${n}-2.0"; tier = "medium"; seconds = 3; mib = 120; }) [ "a" "b" "c" ];
  tools = map (n: build { name = "tool-${toString n}-0.1"; tier = "light"; seconds = 2; mib = 30; deps = [ (builtins.elemAt libs (n - 1)) ]; }) [ 1 2 3 ];
in
build { name = "home-environment"; tier = "light"; seconds = 1; mib = 10; deps = runtimes ++ tools; }
