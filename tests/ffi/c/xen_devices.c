/* Prints the gntdev and evtchn ioctl numbers and struct layouts from Xen's and Linux's
 * headers as JSON, for tests/ffi/xen_devices_test.ts. */
#include <stddef.h>
#include <sys/ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/sys/evtchn.h>
#include <xen/sys/gntdev.h>

#define NUM(name, value) (printf("%s\"%s\": %llu", first ? "" : ",\n", name, (unsigned long long)(value)), first = 0)

int main(void) {
  int first = 1;
  printf("{\n");
  NUM("IOCTL_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF);
  NUM("IOCTL_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF);
  NUM("IOCTL_SET_UNMAP_NOTIFY", IOCTL_GNTDEV_SET_UNMAP_NOTIFY);
  NUM("IOCTL_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY);
  NUM("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE);
  NUM("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT);
  NUM("COPY_SEGMENT_SIZE", sizeof(struct ioctl_gntdev_grant_copy_segment));
  NUM("GNTCOPY_SOURCE_GREF", GNTCOPY_source_gref);
  NUM("GNTCOPY_DEST_GREF", GNTCOPY_dest_gref);
  NUM("MAP_GRANT_REF_SIZE", sizeof(struct ioctl_gntdev_map_grant_ref));
  NUM("MAP_OFF_COUNT", offsetof(struct ioctl_gntdev_map_grant_ref, count));
  NUM("MAP_OFF_INDEX", offsetof(struct ioctl_gntdev_map_grant_ref, index));
  NUM("MAP_OFF_REFS", offsetof(struct ioctl_gntdev_map_grant_ref, refs));
  NUM("GRANT_REF_OFF_DOMID", offsetof(struct ioctl_gntdev_grant_ref, domid));
  NUM("GRANT_REF_OFF_REF", offsetof(struct ioctl_gntdev_grant_ref, ref));
  NUM("UNMAP_SIZE", sizeof(struct ioctl_gntdev_unmap_grant_ref));
  NUM("UNMAP_OFF_INDEX", offsetof(struct ioctl_gntdev_unmap_grant_ref, index));
  NUM("UNMAP_OFF_COUNT", offsetof(struct ioctl_gntdev_unmap_grant_ref, count));
  NUM("NOTIFY_SIZE", sizeof(struct ioctl_gntdev_unmap_notify));
  NUM("NOTIFY_OFF_ACTION", offsetof(struct ioctl_gntdev_unmap_notify, action));
  NUM("NOTIFY_OFF_PORT", offsetof(struct ioctl_gntdev_unmap_notify, event_channel_port));
  NUM("COPY_SIZE", sizeof(struct ioctl_gntdev_grant_copy));
  NUM("COPY_OFF_COUNT", offsetof(struct ioctl_gntdev_grant_copy, count));
  NUM("COPY_OFF_SEGMENTS", offsetof(struct ioctl_gntdev_grant_copy, segments));
  NUM("SEG_OFF_SOURCE", offsetof(struct ioctl_gntdev_grant_copy_segment, source));
  NUM("SEG_OFF_DEST", offsetof(struct ioctl_gntdev_grant_copy_segment, dest));
  NUM("SEG_OFF_LEN", offsetof(struct ioctl_gntdev_grant_copy_segment, len));
  NUM("SEG_OFF_FLAGS", offsetof(struct ioctl_gntdev_grant_copy_segment, flags));
  NUM("SEG_OFF_STATUS", offsetof(struct ioctl_gntdev_grant_copy_segment, status));
  NUM("FOREIGN_OFF_REF", offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.ref));
  NUM("FOREIGN_OFF_OFFSET", offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.offset));
  NUM("FOREIGN_OFF_DOMID", offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.domid));
  NUM("GNTST_bad_gntref", (uint64_t)(-GNTST_bad_gntref));
  NUM("GNTST_permission_denied", (uint64_t)(-GNTST_permission_denied));
  NUM("GNTST_no_space", (uint64_t)(-GNTST_no_space));
  NUM("IOCTL_BIND_VIRQ", IOCTL_EVTCHN_BIND_VIRQ);
  NUM("IOCTL_BIND_INTERDOMAIN", IOCTL_EVTCHN_BIND_INTERDOMAIN);
  NUM("IOCTL_BIND_UNBOUND_PORT", IOCTL_EVTCHN_BIND_UNBOUND_PORT);
  NUM("IOCTL_UNBIND", IOCTL_EVTCHN_UNBIND);
  NUM("IOCTL_NOTIFY", IOCTL_EVTCHN_NOTIFY);
  NUM("IOCTL_RESET", IOCTL_EVTCHN_RESET);
  NUM("IOCTL_RESTRICT_DOMID", IOCTL_EVTCHN_RESTRICT_DOMID);
  NUM("BIND_INTERDOMAIN_SIZE", sizeof(struct ioctl_evtchn_bind_interdomain));
  NUM("BIND_OFF_REMOTE_DOMAIN", offsetof(struct ioctl_evtchn_bind_interdomain, remote_domain));
  NUM("BIND_OFF_REMOTE_PORT", offsetof(struct ioctl_evtchn_bind_interdomain, remote_port));
  printf("\n}\n");
  return 0;
}
