/*
 * Test-only shim, never shipped: current Rust std calls ProcessPrng from
 * bcryptprimitives.dll, which Wine 8 does not provide. This DLL forwards it to
 * SystemFunction036 (RtlGenRandom) in advapi32, which Wine has, so chronicle.exe can
 * run under Wine in packaging/check-wine.sh.
 */
#include <windows.h>

typedef BOOLEAN (WINAPI *rtl_gen_random_fn)(PVOID, ULONG);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    static rtl_gen_random_fn rtl_gen_random = NULL;
    if (rtl_gen_random == NULL) {
        HMODULE advapi = LoadLibraryA("advapi32.dll");
        if (advapi == NULL) return FALSE;
        rtl_gen_random = (rtl_gen_random_fn)GetProcAddress(advapi, "SystemFunction036");
        if (rtl_gen_random == NULL) return FALSE;
    }
    while (len > 0) {
        ULONG chunk = len > 0x7fffffff ? 0x7fffffff : (ULONG)len;
        if (!rtl_gen_random(data, chunk)) return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
