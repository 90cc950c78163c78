/* Links statically against libmesh_ffi.a through the generated C header
 * (the one Swift imports) and checks that the library answers what the
 * generated Swift expects: the UniFFI contract version and the checksum of
 * MeshNode.node_id. Built and run by mesh-ffi/test-bindings.sh. */
#include <stdio.h>
#include "mesh_ffiFFI.h"

int main(void) {
    uint32_t contract = ffi_mesh_ffi_uniffi_contract_version();
    uint16_t checksum = uniffi_mesh_ffi_checksum_method_meshnode_node_id();
    printf("contract version %u (Swift expects %u), node_id checksum %u (Swift expects %u)\n",
           contract, (unsigned)EXPECTED_CONTRACT, checksum, (unsigned)EXPECTED_CHECKSUM);
    return contract == EXPECTED_CONTRACT && checksum == EXPECTED_CHECKSUM ? 0 : 1;
}
