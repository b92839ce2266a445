# Glue for builtins.optimizeFor, evaluated once per evaluation by the plugin. It only reads facts
# from a derivation and mechanically applies a plan; every decision is made in Rust
# (nix-tier-model's `optimize` module). Kept in the nixpkgs idiom: override, then overrideAttrs.
let
  # nixpkgs' lib.functionArgs: `override` is a functor carrying the wrapped function's arguments.
  functionArgs = f:
    if f ? __functor then f.__functionArgs or (functionArgs (f.__functor f))
    else builtins.functionArgs f;

  # Re-applying starts from the derivation before any optimizeFor, so the last call wins.
  original = drv: drv.nixTier.original or drv;

  joinFlags = flags: builtins.concatStringsSep " " (builtins.filter (s: s != "") flags);
in
{
  inspect = drv:
    let
      base = original drv;
      cc = base.stdenv.cc or null;
    in
    {
      name = base.name;
      pname = base.pname or null;
      requiredSystemFeatures = base.requiredSystemFeatures or [ ];
      hasOverrideAttrs = base ? overrideAttrs;
      hasCargoDeps = base ? cargoDeps;
      hasGoModules = base ? goModules || base ? vendorHash;
      overrideArgs = if base ? override then builtins.attrNames (functionArgs base.override) else [ ];
      compiler =
        if cc == null then null
        else { gnu = cc.isGNU or false; clang = cc.isClang or false; version = cc.version or null; };
    };

  apply = plan: drv:
    let
      base = original drv;
      overridden = if plan.overrideArgs == { } then base else base.override plan.overrideArgs;
    in
    overridden.overrideAttrs (old:
      let
        env = old.env or { };
        # A variable stays where the package keeps it: in `env` (nixpkgs forbids both) or top level.
        current = name: if env ? ${name} then env.${name} else old.${name} or "";
        values =
          builtins.mapAttrs (name: extra: joinFlags [ (toString (current name)) extra ]) plan.append
          // plan.set;
        inEnv = builtins.filter (name: env ? ${name}) (builtins.attrNames values);
        topLevel = removeAttrs values inEnv;
        features = old.requiredSystemFeatures or [ ];
      in
      topLevel // {
        requiredSystemFeatures =
          features ++ builtins.filter (f: !builtins.elem f features) plan.systemFeatures;
        passthru = (old.passthru or { }) // { nixTier = plan.info // { original = base; }; };
      } // (if inEnv == [ ] then { } else {
        env = env // builtins.listToAttrs (map (name: { inherit name; value = values.${name}; }) inEnv);
      }));
}
