// The file `plugin-files` names. Nix's C++ ABI changes between versions, so a plugin build only
// loads into the Nix it was built against; loaded into another, its missing symbols make every
// Nix command fail before any code of it runs. This loader refers to no Nix symbol, so it always
// loads. At load time it reads the running Nix's version and loads the plugin build made for
// exactly that version, which sits beside it as
//
//     <directory of this file>/nix-tier-plugin/<Nix version>/libnix_tier_plugin.so
//
// (one installation may carry builds for several Nix versions). Without such a build, or when the
// build does not load, it prints one warning naming both versions and what to rebuild, and Nix
// carries on without the plugin's builtins.
#include <dirent.h>
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace {

// nix::nixVersion, a std::string defined by libnixstore in every Nix from 2.8 on. It is looked up
// at run time rather than linked, so that a Nix without it cannot stop this file from loading.
const char * const nixVersionSymbol = "_ZN3nix10nixVersionB5cxx11E";

const char * const buildsDirectory = "nix-tier-plugin";
const char * const buildFile = "libnix_tier_plugin.so";

const char * const rebuildAdvice =
    "rebuild nix-tier-plugin against the running Nix (NixOS and home-manager modules: it follows "
    "nix.package; flake: nix-tier-plugin.override { nix = <this Nix>; }; Debian bookworm: "
    "./scripts/setup)";

void warn(const std::string & message)
{
    std::fprintf(stderr, "warning: nix-tier: %s\n", message.c_str());
}

/// The Nix versions for which a build sits in `builds`, sorted, for the warning.
std::string availableVersions(const std::string & builds)
{
    std::vector<std::string> versions;
    if (DIR * dir = opendir(builds.c_str())) {
        while (const dirent * entry = readdir(dir)) {
            std::string name = entry->d_name;
            if (name != "." && name != ".." && access((builds + "/" + name + "/" + buildFile).c_str(), F_OK) == 0)
                versions.push_back(name);
        }
        closedir(dir);
    }
    if (versions.empty())
        return "none";
    std::sort(versions.begin(), versions.end());
    std::string list;
    for (const auto & version : versions)
        list += (list.empty() ? "" : ", ") + version;
    return list;
}

void loadBuildForThisNix()
{
    Dl_info self{};
    if (!dladdr(reinterpret_cast<void *>(&loadBuildForThisNix), &self) || !self.dli_fname) {
        warn("the plugin loader cannot find its own file, so it loads no plugin build");
        return;
    }
    std::string loader = self.dli_fname;
    std::string builds = loader.substr(0, loader.find_last_of('/') + 1) + buildsDirectory;

    auto nixVersion = static_cast<const std::string *>(dlsym(RTLD_DEFAULT, nixVersionSymbol));
    if (!nixVersion) {
        warn("cannot tell which Nix version loaded " + loader + " (this Nix has no nix::nixVersion), "
            "so no plugin build is loaded (builds for Nix: " + availableVersions(builds) + ")");
        return;
    }
    std::string build = builds + "/" + *nixVersion + "/" + buildFile;
    if (access(build.c_str(), F_OK) != 0) {
        warn("no plugin build for Nix " + *nixVersion + " in " + builds + " (builds for Nix: "
            + availableVersions(builds) + "), so builtins.hardwareProfile and builtins.optimizeFor "
            "are missing; " + rebuildAdvice);
        return;
    }
    // RTLD_NOW: a symbol this Nix lacks fails here, not later in the middle of an evaluation.
    if (!dlopen(build.c_str(), RTLD_NOW | RTLD_LOCAL)) {
        const char * error = dlerror();
        warn("the plugin build for Nix " + *nixVersion + " does not load into Nix " + *nixVersion
            + " (" + (error ? error : "unknown error") + "), so builtins.hardwareProfile and "
            "builtins.optimizeFor are missing; it was built against another Nix: " + rebuildAdvice);
    }
}

// Runs when Nix dlopens this file. Nothing may escape: an exception here would end Nix.
[[gnu::constructor]] void load() noexcept
{
    try {
        loadBuildForThisNix();
    } catch (...) {
        warn("the plugin loader failed unexpectedly, so no plugin build is loaded");
    }
}

} // namespace
