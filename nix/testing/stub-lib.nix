# A stand-in for the parts of nixpkgs' `lib` that nix-tier's modules and the fixtures of
# ./nixos.nix and ./home-manager.nix use, with a small `evalModules`, so that the modules can be
# evaluated (tests/tests/nix_files.rs) and documented (scripts/gen-reference) where nixpkgs is
# not available.
#
# It mirrors what decides behaviour in nixpkgs' lib/types.nix, lib/options.nix and
# lib/modules.nix: every type has nixpkgs' `check` and `merge` (a list merges by concatenation,
# an attribute set attribute by attribute, a scalar only with equal definitions, a package only
# once), nixpkgs' descriptions (the reference shows them), and the same errors for a value of the
# wrong type, conflicting definitions, an undeclared option and an option used but not defined.
# mkIf, mkMerge and mkOverride (mkDefault, mkForce, mkOptionDefault) are pushed down into
# attributes before their conditions are looked at and discharged per option, as
# lib/modules.nix does: a definition of an undeclared option is an error even under a false
# mkIf, and the definitions of the highest priority win, the option's default having
# priority 1500. Not mirrored: imports, option declarations merged across modules, mkOrder.
let
  inherit (builtins) all attrNames concatLists concatStringsSep elem filter foldl' head isAttrs isBool
    isFloat isFunction isInt isList isPath isString length listToAttrs map mapAttrs match substring tail
    toJSON tryEval typeOf zipAttrsWith;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";
  isStringLike = v: isString v || isPath v || (isAttrs v && (v ? outPath || v ? __toString));
  tagged = tag: v: isAttrs v && (v._type or null) == tag;
  isOption = tagged "option";
  showOption = concatStringsSep ".";
  # A definition's value in an error message.
  showValue = v:
    if isDerivation v then "<derivation ${v.name}>"
    else if isFunction v then "<function>"
    else let shown = tryEval (toJSON v); in if shown.success then shown.value else "<${typeOf v}>";
  showDefs = defs: concatStringsSep "" (map (d: "\n- In `${d.file}': ${showValue d.value}") defs);

  # lib/options.nix
  mergeEqualOption = loc: defs:
    (foldl' (first: def:
      if def.value != first.value
      then throw "The option `${showOption loc}' has conflicting definition values:${showDefs [ first def ]}"
      else first) (head defs) (tail defs)).value;
  mergeOneOption = loc: defs:
    if length defs == 1 then (head defs).value
    else throw "The option `${showOption loc}' is defined multiple times while it's expected to be unique.\nDefinition values:${showDefs defs}";

  mkOptionType = { name, description ? name, check ? (_: true), merge ? mergeEqualOption, ... }@attrs:
    attrs // { _type = "option-type"; inherit name description check merge; };

  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkOverride = priority: content: { _type = "override"; inherit priority content; };

  # lib/modules.nix, pushDownProperties: a definition as { name = [ values ]; }, with mkIf and
  # mkOverride moved onto each attribute, without evaluating conditions.
  pushDown = v:
    if tagged "merge" v then zipAttrsWith (_: concatLists) (map pushDown v.contents)
    else if tagged "if" v then mapAttrs (_: map (mkIf v.condition)) (pushDown v.content)
    else if tagged "override" v then mapAttrs (_: map (mkOverride v.priority)) (pushDown v.content)
    else if isAttrs v then mapAttrs (_: x: [ x ]) v
    else throw "a definition of an attribute set of options is not an attribute set: ${showValue v}";

  # dischargeProperties: the values a definition contributes, with their priorities.
  discharge = priority: v:
    if tagged "merge" v then concatLists (map (discharge priority) v.contents)
    else if tagged "if" v then
      (if isBool v.condition then (if v.condition then discharge priority v.content else [ ])
       else throw "mkIf called with a non-Boolean condition")
    else if tagged "override" v then discharge v.priority v.content
    else [ { inherit priority; value = v; } ];

  # evalOptionValue: the definitions of the highest priority (the default counting as
  # mkOptionDefault), type-checked and merged by the type.
  evalOption = loc: opt: defs:
    let
      discharged = concatLists (map (d: map (r: r // { inherit (d) file; }) (discharge 100 d.value)) defs)
        ++ (if opt ? default then [ { file = "the default of ${showOption loc}"; priority = 1500; value = opt.default; } ] else [ ]);
      best = foldl' (p: d: if d.priority < p then d.priority else p) 9999 discharged;
      chosen = filter (d: d.priority == best) discharged;
      wrong = filter (d: !(opt.type.check d.value)) chosen;
    in
    if chosen == [ ] then throw "The option `${showOption loc}' is used but not defined."
    else if wrong != [ ] then throw "A definition for option `${showOption loc}' is not of type `${opt.type.description}'. Definition values:${showDefs wrong}"
    else opt.type.merge loc chosen;

  # Definitions ({ file; value; }) of an attribute set, by attribute name.
  byName = defs: zipAttrsWith (_: concatLists)
    (map (d: mapAttrs (_: map (value: { inherit (d) file; inherit value; })) (pushDown d.value)) defs);

  # attrsOf: every defined attribute merged by the element type; attributes whose definitions
  # all vanish (a false mkIf) are left out.
  evalAttrs = loc: elemType: defs:
    let
      named = byName defs;
      present = filter (n: concatLists (map (d: discharge 100 d.value) named.${n}) != [ ]) (attrNames named);
    in
    listToAttrs (map (n: { name = n; value = evalOption (loc ++ [ n ]) { type = elemType; } named.${n}; }) present);

  # An option tree: declared options get their values; an undeclared attribute is an error, or
  # goes to `freeformType` when the tree has one (types.submodule { freeformType; }).
  evalTree = loc: tree: freeformType: defs:
    let
      named = byName defs;
      undeclared = filter (n: !(tree ? ${n})) (attrNames named);
      free = concatLists (map (n: map (d: { inherit (d) file; value = { ${n} = d.value; }; }) named.${n}) undeclared);
      declared = mapAttrs (n: sub:
        if isOption sub then evalOption (loc ++ [ n ]) sub (named.${n} or [ ])
        else evalTree (loc ++ [ n ]) sub null (named.${n} or [ ])) tree;
    in
    if undeclared != [ ] && freeformType == null then
      let n = head undeclared; in
      throw "The option `${showOption (loc ++ [ n ])}' does not exist. Definition values:${showDefs named.${n}}"
    else if freeformType == null then declared
    else freeformType.merge loc free // declared;

  types = rec {
    bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; };
    int = mkOptionType { name = "int"; description = "signed integer"; check = isInt; };
    float = mkOptionType { name = "float"; description = "floating point number"; check = isFloat; };
    str = mkOptionType { name = "str"; description = "string"; check = isString; };
    lines = mkOptionType {
      name = "lines";
      description = "strings concatenated with \"\\n\"";
      check = isString;
      merge = _loc: defs: concatStringsSep "\n" (map (d: d.value) defs);
    };
    # types.path is pathWith { absolute = true; }: a path, or a string starting with "/".
    path = mkOptionType {
      name = "path";
      description = "absolute path";
      check = v: isStringLike v && substring 0 1 (toString v) == "/";
    };
    package = mkOptionType {
      name = "package";
      description = "package";
      check = v: isDerivation v || (isString v && match "/nix/store/.*" v != null);
      merge = mergeOneOption;
    };
    attrs = mkOptionType {
      name = "attrs";
      description = "attribute set";
      check = isAttrs;
      merge = _loc: defs: foldl' (a: d: a // d.value) { } defs;
    };
    unspecified = mkOptionType { name = "unspecified"; description = "unspecified value"; merge = _loc: defs: (head defs).value; };
    anything = mkOptionType {
      name = "anything";
      description = "anything";
      merge = loc: defs:
        let
          kind = v: if isAttrs v && isStringLike v then "stringLike" else typeOf v;
          common = foldl' (k: d: if kind d.value == k then k else throw "The option `${showOption loc}' has conflicting option types")
            (kind (head defs).value) defs;
        in
        if common == "set" then (attrsOf anything).merge loc defs
        else if common == "stringLike" then mergeOneOption loc defs
        else mergeEqualOption loc defs;
    };
    ints = {
      positive = mkOptionType { name = "positiveInt"; description = "positive integer, meaning >0"; check = v: isInt v && v > 0; };
      unsigned = mkOptionType { name = "unsignedInt"; description = "unsigned integer, meaning >=0"; check = v: isInt v && v >= 0; };
    };
    nullOr = t: mkOptionType {
      name = "nullOr";
      description = "null or ${t.description}";
      check = v: v == null || t.check v;
      merge = loc: defs:
        let nulls = filter (d: d.value == null) defs;
        in if length nulls == length defs then null
        else if nulls != [ ] then throw "The option `${showOption loc}' is defined both null and not null:${showDefs defs}"
        else t.merge loc defs;
    };
    listOf = t: mkOptionType {
      name = "listOf";
      description = "list of ${t.description}";
      check = isList;
      merge = loc: defs: concatLists (map (d: map (value: evalOption loc { type = t; } [ { inherit (d) file; inherit value; } ]) d.value) defs);
    };
    attrsOf = t: mkOptionType {
      name = "attrsOf";
      description = "attribute set of ${t.description}";
      check = isAttrs;
      merge = loc: defs: evalAttrs loc t defs;
    };
    enum = values: mkOptionType {
      name = "enum";
      description = "one of ${concatStringsSep ", " (map toJSON values)}";
      check = v: elem v values;
    };
    either = a: b: mkOptionType {
      name = "either";
      description = "${a.description} or ${b.description}";
      check = v: a.check v || b.check v;
      merge = loc: defs:
        if all (d: a.check d.value) defs then a.merge loc defs
        else if all (d: b.check d.value) defs then b.merge loc defs
        else mergeOneOption loc defs;
    };
    oneOf = ts: foldl' either (head ts) (tail ts);
    submodule = { options ? { }, freeformType ? null }: mkOptionType {
      name = "submodule";
      description = "submodule";
      check = isAttrs;
      merge = loc: defs: evalTree loc options freeformType defs;
    };
  };

  # Option declarations of several modules as one tree; an option declared twice is an error.
  mergeDeclarations = loc: a: b:
    a // mapAttrs (n: vb:
      if !(a ? ${n}) then vb
      else if isOption vb || isOption a.${n} then throw "The option `${showOption (loc ++ [ n ])}' is declared twice."
      else mergeDeclarations (loc ++ [ n ]) a.${n} vb) b;
in
{
  inherit types isDerivation isStringLike showOption mkOptionType mergeEqualOption mergeOneOption mkIf mkMerge mkOverride;

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: {
    _type = "option";
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
  };
  literalExpression = text: { _type = "literalExpression"; inherit text; };
  literalMD = text: { _type = "literalMD"; inherit text; };

  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  mkOptionDefault = mkOverride 1500;

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  optionalString = cond: s: if cond then s else "";
  getVersion = x: if isString x then x else x.version or (builtins.parseDrvName x.name).version;
  versionAtLeast = v: wanted: builtins.compareVersions v wanted >= 0;
  inherit concatStringsSep;
  boolToString = b: if b then "true" else "false";
  hasPrefix = prefix: s: substring 0 (builtins.stringLength prefix) s == prefix;
  filterAttrs = pred: set: listToAttrs (map (name: { inherit name; value = set.${name}; }) (filter (name: pred name set.${name}) (attrNames set)));
  mapAttrsToList = f: set: map (name: f name set.${name}) (attrNames set);

  /**
    lib.evalModules: `modules` (functions of { config, options, lib, pkgs, ... } returning
    { options; config; }, paths to them, or such attribute sets, named by `_file`) with
    `specialArgs` passed to each. Returns { config; options; }.
  */
  evalModules = { modules, specialArgs ? { } }:
    let
      evaluated = map (m:
        let
          f = if isFunction m then m else if isAttrs m then (_: m) else import m;
          file = if isFunction m then "<module>" else if isAttrs m then m._file or "<module>" else toString m;
          result = f (specialArgs // { inherit config options; });
        in
        { inherit file; options = result.options or { }; config = result.config or { }; }) modules;
      options = foldl' (mergeDeclarations [ ]) { } (map (m: m.options) evaluated);
      config = evalTree [ ] options null (map (m: { inherit (m) file; value = m.config; }) evaluated);
    in
    { inherit config options; };
}
