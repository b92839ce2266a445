# Glue for builtins.optimizeFor, evaluated once per evaluation by the plugin. It only reads facts
# from a derivation and mechanically applies a plan; every decision is made in Rust
# (nix-tier-model's `optimize` module, which also passes the variables a plan may write and the
# switches it may turn on). Kept in the nixpkgs idiom: override, then overrideAttrs.
{ variables, switches }:
let
  # nixpkgs' lib.functionArgs: `override` is a functor carrying the wrapped function's arguments.
  functionArgs = f:
    if f ? __functor then f.__functionArgs or (functionArgs (f.__functor f))
    else builtins.functionArgs f;

  # Re-applying starts from the derivation before any optimizeFor, so the last call wins.
  original = drv: drv.nixTier.original or drv;

in
{
  inspect = options: drv:
    let
      base = original drv;
      cc = base.stdenv.cc or null;
      structured = base.__structuredAttrs or false;
      # With structured attributes only `env` reaches the builder (stdenv's setup exports it).
      env = if structured then base.env or { } else base;
      overrideArgs = if base ? override then builtins.attrNames (functionArgs base.override) else [ ];
      asked = (options.lto or false) || (options.pgo or false);
    in
    {
      name = base.name;
      pname = base.pname or null;
      requiredSystemFeatures = base.requiredSystemFeatures or [ ];
      hasOverrideAttrs = base ? overrideAttrs;
      hasCargoDeps = base ? cargoDeps;
      hasGoModules = base ? goModules || base ? vendorHash;
      inherit overrideArgs;
      compiler =
        if cc == null then null
        else { gnu = cc.isGNU or false; clang = cc.isClang or false; version = cc.version or null; };
      structuredAttrs = structured;
      exported = builtins.filter (name: env ? ${name}) variables;
      hidden = if structured then builtins.filter (name: base ? ${name}) variables else [ ];
      # A switch is on when turning it on changes nothing.
      switchesOn = if !asked then [ ] else builtins.filter
        (s: builtins.elem s overrideArgs && (base.override { ${s} = true; }).drvPath == base.drvPath)
        switches;
      isCompiler = (base.isGNU or false) || (base.isClang or false);
      hasPackageSet = base ? withPackages;
    };

  apply = plan: drv:
    let
      base = original drv;
      overrideArgs = plan.overrideArgs // (if plan.passSelf then { self = result; } else { });
      overridden = if overrideArgs == { } then base else base.override overrideArgs;
      result = overridden.overrideAttrs (old:
        let
          env = old.env or { };
          # A variable stays where the package keeps it: the top level when it is there, else
          # `env` (nixpkgs forbids both, and with structured attributes only `env` is exported).
          values = builtins.mapAttrs (name: extra:
            let current = toString (old.${name} or env.${name} or ""); in
            if current == "" then extra else current + " " + extra) plan.append
            // plan.set;
          top = builtins.intersectAttrs old values;
          inEnv = removeAttrs values (builtins.attrNames top);
          features = old.requiredSystemFeatures or [ ];
        in
        top // plan.attributes // {
          passthru = (old.passthru or { }) // { nixTier = builtins.fromJSON plan.info // { original = base; }; };
        } // (if plan.systemFeatures == [ ] then { } else {
          requiredSystemFeatures =
            features ++ builtins.filter (f: !builtins.elem f features) plan.systemFeatures;
        }) // (if plan.hardeningDisable == [ ] then { } else {
          hardeningDisable = (old.hardeningDisable or [ ]) ++ plan.hardeningDisable;
        }) // (if inEnv == { } then { } else {
          env = env // inEnv;
        }));
    in
    result;
}
