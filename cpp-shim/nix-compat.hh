// Every difference between the Nix versions the shim is built against lives in this header.
// plugin/build.rs defines NIX_TIER_NIX_VERSION_{MAJOR,MINOR,PATCH} from pkg-config's `nix-expr`.
//
// Supported: Nix 2.8 (Debian bookworm's nix-bin; built and loaded in ./scripts/test) and Nix 2.24
// onwards (nixpkgs' nixVersions; scripts/check-newer-nix compiles against Debian trixie's 2.26 in
// every test run; docs/guide.md says what was checked once by hand against 2.24 to 2.35).
// The differences, checked against Nix's headers at each tag:
// - 2.24: primops take a PosIdx; errors are built with state.error<T>(); settings are reached
//   through state.settings; attribute sets through Value::attrs(); forceAttrs wants a context.
// - 2.24-2.27 built with meson: the config-*.hh headers must be included first (2.8: config.h).
// - 2.28: headers moved to nix/{util,store,expr}/ and include their own config.
// - 2.33: PrimOp::doc became std::optional<std::string>.
// - 2.34: PrimOp::fun was renamed impl.
#pragma once

#define NIX_TIER_NIX_VERSION_AT_LEAST(major, minor) \
    (NIX_TIER_NIX_VERSION_MAJOR > (major) ||        \
     (NIX_TIER_NIX_VERSION_MAJOR == (major) && NIX_TIER_NIX_VERSION_MINOR >= (minor)))

#if !NIX_TIER_NIX_VERSION_AT_LEAST(2, 8) \
    || (NIX_TIER_NIX_VERSION_AT_LEAST(2, 9) && !NIX_TIER_NIX_VERSION_AT_LEAST(2, 24))
#error "nix-tier's C++ shim supports Nix 2.8 and Nix 2.24 onwards; add this Nix version's API differences to cpp-shim/nix-compat.hh"
#endif

#if NIX_TIER_NIX_VERSION_AT_LEAST(2, 28)
#include <nix/expr/eval.hh>
#include <nix/expr/eval-inline.hh>
#include <nix/expr/eval-settings.hh>
#include <nix/expr/json-to-value.hh>
#include <nix/expr/primops.hh>
#include <nix/expr/value-to-json.hh>
#include <nix/store/globals.hh>
#include <nix/util/config-global.hh>
#else
// Nix's own headers expect their configuration first (it decides HAVE_BOEHMGC and thus class
// layouts): meson builds (2.24-2.27) install config-*.hh, autotools builds config.h.
#if __has_include(<config-expr.hh>)
#include <config-util.hh>
#include <config-store.hh>
#include <config-expr.hh>
#else
#include <config.h>
#endif
#include <eval.hh>
#include <eval-inline.hh>
#include <globals.hh>
#include <json-to-value.hh>
#include <primops.hh>
#include <value-to-json.hh>
#if NIX_TIER_NIX_VERSION_AT_LEAST(2, 24)
#include <config-global.hh>
#include <eval-settings.hh>
#endif
#endif

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace nix_tier::compat {

#if NIX_TIER_NIX_VERSION_AT_LEAST(2, 24)

/// The source position handed to a primop.
using PrimOpPos = nix::PosIdx;

/// The string context printValueAsJSON collects.
using StringContext = nix::NixStringContext;

/// Throws a Nix evaluation error located at `pos`.
[[noreturn]] inline void throwEvalError(nix::EvalState & state, PrimOpPos pos, const std::string & message)
{
    state.error<nix::EvalError>("%s", message).atPos(pos).debugThrow();
}

/// Whether evaluation is pure (flakes, `--pure-eval`): live host detection is refused then.
inline bool pureEval(nix::EvalState & state)
{
    return state.settings.pureEval;
}

/// The attribute `name` of `v`, an attribute set already forced, or nullptr.
inline nix::Value * attribute(const nix::Value & v, nix::Symbol name)
{
    auto attr = v.attrs()->get(name);
    return attr ? attr->value : nullptr;
}

/// The text of `v`, a string already forced.
inline std::string_view text(const nix::Value & v)
{
    return v.string_view();
}

/// Whether `v`, already forced, is the Boolean `true`.
inline bool isTrue(const nix::Value & v)
{
    return v.type() == nix::nBool && v.boolean();
}

/// Parses Nix source that refers to no files.
inline nix::Expr * parseExpression(nix::EvalState & state, std::string source)
{
    return state.parseExprFromString(std::move(source), state.rootPath(nix::CanonPath::root));
}

/// Registers a primop under `builtins.<name>` (a leading "__" keeps it out of the global scope).
inline void registerPrimOp(const char * name, std::vector<std::string> args, size_t arity,
    const char * doc, nix::PrimOpFun fun)
{
    static std::vector<std::unique_ptr<nix::RegisterPrimOp>> registrations;
    registrations.push_back(std::make_unique<nix::RegisterPrimOp>(nix::PrimOp{
        .name = name,
        .args = std::move(args),
        .arity = arity,
#if NIX_TIER_NIX_VERSION_AT_LEAST(2, 33)
        .doc = doc ? std::optional<std::string>(doc) : std::nullopt,
#else
        .doc = doc,
#endif
#if NIX_TIER_NIX_VERSION_AT_LEAST(2, 34)
        .impl = fun,
#else
        .fun = fun,
#endif
        .experimentalFeature = std::nullopt,
    }));
}

#else // Nix 2.8

using PrimOpPos = const nix::Pos &;

using StringContext = nix::PathSet;

[[noreturn]] inline void throwEvalError(nix::EvalState &, PrimOpPos pos, const std::string & message)
{
    throw nix::EvalError({.level = nix::lvlError, .msg = nix::hintfmt(message), .errPos = pos,
        .traces = {}, .suggestions = {}});
}

inline bool pureEval(nix::EvalState &)
{
    return nix::evalSettings.pureEval;
}

inline nix::Value * attribute(const nix::Value & v, nix::Symbol name)
{
    auto attr = v.attrs->get(name);
    return attr ? attr->value : nullptr;
}

inline std::string_view text(const nix::Value & v)
{
    return v.string.s;
}

inline bool isTrue(const nix::Value & v)
{
    return v.type() == nix::nBool && v.boolean;
}

inline nix::Expr * parseExpression(nix::EvalState & state, std::string source)
{
    return state.parseExprFromString(std::move(source), "/");
}

inline void registerPrimOp(const char * name, std::vector<std::string> args, size_t arity,
    const char * doc, nix::PrimOpFun fun)
{
    static std::vector<std::unique_ptr<nix::RegisterPrimOp>> registrations;
    registrations.push_back(std::make_unique<nix::RegisterPrimOp>(nix::RegisterPrimOp::Info{
        .name = name, .args = std::move(args), .arity = arity, .doc = doc, .fun = fun,
        .experimentalFeature = std::nullopt}));
}

#endif

/// Nix's `system-features`, space-separated (the same `nix::settings` member from 2.8 on).
inline std::string systemFeatures()
{
    std::string joined;
    for (auto & feature : nix::settings.systemFeatures.get())
        joined += (joined.empty() ? "" : " ") + feature;
    return joined;
}

} // namespace nix_tier::compat
