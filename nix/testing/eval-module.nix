# Evaluates one NixOS or home-manager module without nixpkgs, with ./stub-lib.nix: enough to
# check its option declarations and what its `config` defines for given option values
# (tests/tests/nix_files.rs) and to document its options (scripts/gen-reference).
#
#   import ./eval-module.nix {
#     module = ../nixos-module.nix;
#     definitions = { services.nix-tier.enable = true; };   # the user's settings
#     external = { nix.package = pkgs.nix; };                # other modules' config it reads
#   }
#
# returns
#   options  the declared option tree
#   values   every declared option's value: the definition, type-checked, or the default
#   raw      the module's `config` with mkIf resolved and mkMerge merged; mkDefault/mkForce kept
#            as { _type = "override"; priority; content; }
#   config   `raw` with the overrides resolved to their values
#   docs     one record per option, sorted: { name; type; default; example; description; },
#            default and example as { text; markdown; } (markdown: prose from literalMD) or null
#
# Not nixpkgs' module system: no imports, no submodules, no option merging across modules; a
# definition conflicts only with a different definition of the same priority.
{ module
, definitions ? { }
, external ? { }
, pkgs ? import ./stub-pkgs.nix { }
, lib ? pkgs.lib or (import ./stub-lib.nix)
}:
let
  inherit (builtins) attrNames concatLists concatStringsSep filter foldl' isAttrs isBool isFloat isInt isList
    isPath isString listToAttrs map mapAttrs sort toJSON;


  f = if builtins.isFunction module then module else import module;
  isOption = v: isAttrs v && (v._type or null) == "option";
  isDerivation = v: isAttrs v && (v.type or null) == "derivation";
  tagged = tag: v: isAttrs v && (v._type or null) == tag;
  absent = { _type = "absent"; };
  isAbsent = tagged "absent";

  # Option values from the definitions, checked against the declarations.
  valuesOf = path: opts: defs:
    let
      unknown = filter (n: !(opts ? ${n})) (attrNames defs);
    in
    if unknown != [ ] then
      throw "no option ${concatStringsSep ", " (map (n: concatStringsSep "." (path ++ [ n ])) unknown)} is declared"
    else
      mapAttrs (name: opt:
        let
          p = path ++ [ name ];
          shown = concatStringsSep "." p;
        in
        if isOption opt then
          if defs ? ${name} then
            (if opt.type.check defs.${name} then defs.${name}
             else throw "option ${shown}: ${toJSON defs.${name}} is not a ${opt.type.description}")
          else if opt ? default then opt.default
          else throw "option ${shown} is used but not defined and has no default"
        else valuesOf p opt (defs.${name} or { })) opts;

  # mkIf, mkMerge resolved; overrides kept.
  resolve = v:
    if tagged "if" v then (if v.condition then resolve v.content else absent)
    else if tagged "merge" v then foldl' merge absent (map resolve v.contents)
    else if tagged "override" v then v // { content = resolve v.content; }
    else if isAttrs v && !(isDerivation v) && !(v ? _type) then
      let resolved = mapAttrs (_: resolve) v;
      in listToAttrs (map (name: { inherit name; value = resolved.${name}; }) (filter (n: !(isAbsent resolved.${n})) (attrNames resolved)))
    else v;

  priority = v: if tagged "override" v then v.priority else 100;
  content = v: if tagged "override" v then v.content else v;
  merge = a: b:
    if isAbsent a then b
    else if isAbsent b then a
    else if priority a < priority b then a
    else if priority b < priority a then b
    else
      let
        ca = content a;
        cb = content b;
        merged =
          if isAttrs ca && isAttrs cb && !(isDerivation ca) && !(isDerivation cb) then
            ca // mapAttrs (n: vb: if ca ? ${n} then merge ca.${n} vb else vb) cb
          else if isList ca && isList cb then ca ++ cb
          else if ca == cb then ca
          else throw "conflicting definitions: ${toJSON ca} and ${toJSON cb}";
      in
      if tagged "override" a then a // { content = merged; } else merged;

  strip = v:
    if tagged "override" v then strip v.content
    else if isAttrs v && !(isDerivation v) then mapAttrs (_: strip) v
    else if isList v then map strip v
    else v;

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

  recursiveUpdate = a: b:
    a // mapAttrs (n: vb: if isAttrs vb && !(isDerivation vb) && isAttrs (a.${n} or null) && !(isDerivation a.${n}) then recursiveUpdate a.${n} vb else vb) b;

  config = recursiveUpdate external values;
  evaluated = f { inherit config lib pkgs; options = declared; };
  declared = evaluated.options or { };
  values = valuesOf [ ] declared definitions;
  raw = let r = resolve (evaluated.config or { }); in if isAbsent r then { } else r;
in
{
  options = declared;
  inherit values raw;
  config = strip raw;
  docs = sort (a: b: a.name < b.name) (docsOf [ ] declared);
}
