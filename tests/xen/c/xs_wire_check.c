/*
 * Prints, as one JSON object, the xenstore wire constants from Xen's io/xs_wire.h
 * (Debian libxen-dev): message type numbers, sizeof(struct xsd_sockmsg), the payload and path
 * limits, and the xsd_errors names in order. tests/xen/xs_wire_check_test.ts compares them with
 * xen/xenstore/wire.ts.
 */
#include <errno.h> /* before xs_wire.h: it declares xsd_errors[] only if EINVAL is defined */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/xs_wire.h>

#define TYPE(name) printf("%s\"%s\":%d", first ? "" : ",", #name, (int)XS_##name), first = 0

int main(void) {
    int first = 1;
    printf("{\"types\":{");
    TYPE(CONTROL);
    TYPE(DIRECTORY);
    TYPE(READ);
    TYPE(GET_PERMS);
    TYPE(WATCH);
    TYPE(UNWATCH);
    TYPE(TRANSACTION_START);
    TYPE(TRANSACTION_END);
    TYPE(INTRODUCE);
    TYPE(RELEASE);
    TYPE(GET_DOMAIN_PATH);
    TYPE(WRITE);
    TYPE(MKDIR);
    TYPE(RM);
    TYPE(SET_PERMS);
    TYPE(WATCH_EVENT);
    TYPE(ERROR);
    TYPE(IS_DOMAIN_INTRODUCED);
    TYPE(RESUME);
    TYPE(SET_TARGET);
    TYPE(RESET_WATCHES);
    TYPE(DIRECTORY_PART);
    printf("},\"debug\":%d,\"type_count\":%d", (int)XS_DEBUG, (int)XS_TYPE_COUNT);
    printf(",\"sockmsg_size\":%zu", sizeof(struct xsd_sockmsg));
    printf(",\"sockmsg_offsets\":[%zu,%zu,%zu,%zu]", offsetof(struct xsd_sockmsg, type),
           offsetof(struct xsd_sockmsg, req_id), offsetof(struct xsd_sockmsg, tx_id),
           offsetof(struct xsd_sockmsg, len));
    printf(",\"payload_max\":%d,\"abs_path_max\":%d,\"rel_path_max\":%d", XENSTORE_PAYLOAD_MAX,
           XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX);
    printf(",\"errors\":[");
    for (size_t i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++) {
        printf("%s\"%s\"", i == 0 ? "" : ",", xsd_errors[i].errstring);
    }
    printf("]}\n");
    return 0;
}
