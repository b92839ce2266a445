# The options a module declares, as Markdown (one `####` section per option, sorted), for
# docs/reference.md (scripts/gen-reference). Evaluated with ./eval-module.nix: no nixpkgs, and
# no default is evaluated where the module gives a defaultText.
{ module }:
let
  inherit (builtins) concatStringsSep map match;
  docs = (import ./eval-module.nix { inherit module; }).docs;

  trimEnd = s: let m = match "(.*[^\n ])[\n ]*" s; in if m == null then s else builtins.head m;
  value = label: v:
    if v == null then ""
    else if v.markdown then "\n*${label}:* ${trimEnd v.text}\n"
    else if match ".*\n.*" v.text != null then "\n*${label}:*\n\n```nix\n${trimEnd v.text}\n```\n"
    else "\n*${label}:* `${v.text}`\n";
  section = o:
    "#### `${o.name}`\n\n${trimEnd o.description}\n\n*Type:* ${o.type}\n"
    + value "Default" o.default
    + value "Example" o.example;
in
concatStringsSep "\n" (map section docs)
