# Evaluates nix-tier's NixOS or home-manager module without nixpkgs, with ./stub-lib.nix's
# evalModules, beside `fixtures`: the stand-ins for the NixOS (./nixos.nix) or home-manager
# (./home-manager.nix) modules whose options it defines and reads. tests/tests/nix_files.rs
# checks what a configuration comes to; scripts/gen-reference documents the options.
#
#   import ./eval-module.nix {
#     module = ../nixos-module.nix;
#     fixtures = import ./nixos.nix { };
#     definitions = { services.nix-tier.enable = true; nix.package = pkgs.nix; };   # the user's
#   }
#
# (`definitions` may be a list of such attribute sets: separate definitions, merged.)
#
# returns
#   config   the whole configuration: every declared option's value
#   options  the declared option tree
#   docs     one record per option of `module`, sorted: { name; type; default; example;
#            description; }, default and example as { text; markdown; } (markdown: prose from
#            literalMD) or null
{ module
, fixtures ? [ ]
, definitions ? { }
, pkgs ? import ./stub-pkgs.nix { }
, lib ? pkgs.lib or (import ./stub-lib.nix)
}:
let
  inherit (builtins) attrNames concatLists concatStringsSep isAttrs isBool isFloat isInt isList isPath isString
    map sort toJSON;

  tagged = tag: v: isAttrs v && (v._type or null) == tag;
  isOption = tagged "option";
  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  evaluated = lib.evalModules {
    modules = [ module ] ++ fixtures
      ++ map (d: { _file = "definitions"; config = d; }) (if isList definitions then definitions else [ definitions ]);
    specialArgs = { inherit lib pkgs; };
  };
  # The module's own declarations, for its documentation.
  own = (import module { inherit (evaluated) config options; inherit lib pkgs; }).options;

  # A value as Nix source, for the documentation.
  show = v:
    if v == null then "null"
    else if isBool v then (if v then "true" else "false")
    else if isInt v || isFloat v then toString v
    else if isString v then toJSON v
    else if isPath v then toString v
    else if isList v then (if v == [ ] then "[ ]" else "[ ${concatStringsSep " " (map show v)} ]")
    else if tagged "literalExpression" v || tagged "literalMD" v then v.text
    else if isDerivation v then "<derivation ${v.name}>"
    else if isAttrs v then (if v == { } then "{ }" else "{ ${concatStringsSep " " (map (n: "${n} = ${show v.${n}};") (attrNames v))} }")
    else "<${builtins.typeOf v}>";

  # { text; markdown; }: Nix source, or prose (literalMD).
  render = v: if tagged "literalMD" v then { text = v.text; markdown = true; } else { text = show v; markdown = false; };

  docsOf = path: opts: concatLists (map (name:
    let
      opt = opts.${name};
      p = path ++ [ name ];
    in
    if isOption opt then [{
      name = concatStringsSep "." p;
      type = opt.type.description;
      default = if opt ? defaultText then render opt.defaultText else if opt ? default then render opt.default else null;
      example = if opt ? example then render opt.example else null;
      description = opt.description or null;
    }]
    else docsOf p opt) (attrNames opts));
in
{
  inherit (evaluated) config options;
  docs = sort (a: b: a.name < b.name) (docsOf [ ] own);
}
