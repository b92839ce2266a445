// Every difference between the Nix versions the shim is built against lives in this header.
// plugin/build.rs defines NIX_TIER_NIX_VERSION_{MAJOR,MINOR,PATCH} from pkg-config's `nix-expr`.
//
// Supported and tested: Nix 2.8 (Debian bookworm's nix-bin). Later versions changed the plugin API
// (2.9+ primops take PosIdx, 2.17 nix::PrimOp registration, 2.28 moved headers to nix/expr/...,
// 2.33 mkString(s, state.mem), 2.34 PrimOp::fun renamed impl); each needs its branch here.
#pragma once

#define NIX_TIER_NIX_VERSION_AT_LEAST(major, minor) \
    (NIX_TIER_NIX_VERSION_MAJOR > (major) ||        \
     (NIX_TIER_NIX_VERSION_MAJOR == (major) && NIX_TIER_NIX_VERSION_MINOR >= (minor)))

#if !NIX_TIER_NIX_VERSION_AT_LEAST(2, 8) || NIX_TIER_NIX_VERSION_AT_LEAST(2, 9)
#error "nix-tier's C++ shim supports Nix 2.8; add this Nix version's API differences to cpp-shim/nix-compat.hh"
#endif

// Nix's own headers expect config.h first (it decides HAVE_BOEHMGC and thus class layouts).
#include <config.h>
#include <eval.hh>
#include <eval-inline.hh>
#include <globals.hh>
#include <json-to-value.hh>
#include <primops.hh>
#include <value-to-json.hh>

#include <string>

namespace nix_tier::compat {

/// The source position handed to a primop.
using PrimOpPos = const nix::Pos &;

/// Throws a Nix evaluation error located at `pos`.
[[noreturn]] inline void throwEvalError(PrimOpPos pos, const std::string & message)
{
    throw nix::EvalError({.level = nix::lvlError, .msg = nix::hintfmt(message), .errPos = pos,
        .traces = {}, .suggestions = {}});
}

/// Whether evaluation is pure (flakes, `--pure-eval`): live host detection is refused then.
inline bool pureEval(nix::EvalState &)
{
    return nix::evalSettings.pureEval;
}

/// Registers a primop under `builtins.<name>` (a leading "__" keeps it out of the global scope).
inline void registerPrimOp(const char * name, std::vector<std::string> args, size_t arity,
    const char * doc, nix::PrimOpFun fun)
{
    static std::vector<std::unique_ptr<nix::RegisterPrimOp>> registrations;
    registrations.push_back(std::make_unique<nix::RegisterPrimOp>(nix::RegisterPrimOp::Info{
        .name = name, .args = std::move(args), .arity = arity, .doc = doc, .fun = fun,
        .experimentalFeature = std::nullopt}));
}

} // namespace nix_tier::compat
