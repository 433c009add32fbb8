/* The rule walk as a job for a program of its own. Inlined into the
 * pipeline, the verifier would walk 1,024 rules once per path that leads
 * there, far past its limits. So on a flow-table miss the pipeline leaves
 * the question in the per-CPU job and its caller tail-calls the eval
 * program (slot PROG_FW_EVAL), which answers and tail-calls the pipeline
 * (PROG_MAIN) again from the start; this time the answer is waiting. A
 * program and the one it tail-calls run on one CPU without a break, so a
 * per-CPU job cannot be taken over by another packet in between. */
#ifndef XDE_FW_JOB_H
#define XDE_FW_JOB_H

#include "pin.h"
#include "counters.h"
#include "pkt.h"
#include "fw_rules.h"

enum fw_job_state { JOB_IDLE = 0, JOB_PENDING = 1, JOB_DONE = 2 };
struct fw_job {
	struct pkt p;
	__u32 port;
	__u32 dir;
	__u32 vni;
	__u32 stage;              /* enum fw_stage: which firewall check posted it */
	__u32 epoch;              /* the port's rules it is judged by (port_cfg.fw_epoch) */
	__u32 state;              /* enum fw_job_state */
	__u32 action;             /* the answer: enum fw_action, 0 when no rule matched */
	__u32 rule_id;
};
XDE_MAP("percpu_array", u32, struct fw_job, fw_job, 1);

/* Slots of the tail-call program arrays, one array per hook type
 * (PROG_GATEWAY, PROG_SNAT: TC only). */
enum { PROG_MAIN = 0, PROG_FW_EVAL = 1, PROG_GATEWAY = 2, PROG_NAT = 3, PROG_SNAT = 4 };
XDE_MAP("prog", u32, u32, xdp_progs, 4);
XDE_MAP("prog", u32, u32, tc_progs, 5);

static __always_inline struct fw_job *fw_job_get(void)
{
	__u32 zero = 0;
	return fw_job.lookup(&zero);
}

/* The firewall checks a pipeline makes, in the order they come: an answer
 * is taken only by the check that asked, and a TC run resuming after the
 * walk of STAGE_TC_LOCAL_IN knows that its outbound check was counted in
 * an earlier run. */
enum fw_stage { STAGE_XDP_IN = 1, STAGE_TC_OUT = 2, STAGE_TC_LOCAL_IN = 3 };

/* Which TC run this is: 0 the first, else the stage whose walk it resumes
 * after. */
static __always_inline __u32 fw_tc_resumed(struct fw_job *j)
{
	if (!j || j->state != JOB_DONE || j->stage == STAGE_XDP_IN)
		return 0;
	return j->stage;
}

/* A TC run that returns (no tail call) ends its packet's pipeline: no
 * answer may stay behind for another packet to take. */
static __always_inline void fw_job_end(struct fw_job *j)
{
	if (j && j->state != JOB_IDLE)
		j->state = JOB_IDLE;
}

static __always_inline int same_pkt(struct pkt *a, struct pkt *b)
{
	return addr_eq(a->src, b->src) && addr_eq(a->dst, b->dst) && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto;
}

/* The rules' verdict on p going dir through port, judged by the rules of
 * epoch, asked by stage: 1 with *allow set when the eval program has
 * answered, 0 after posting the question. */
static __always_inline int fw_rules_verdict(__u32 port, __u32 dir, struct pkt *p, __u32 vni,
					    __u32 epoch, __u32 stage, __u32 *rule_id, int *allow)
{
	struct fw_job *j = fw_job_get();
	if (!j) {
		*allow = 0;
		return 1;
	}
	if (j->state == JOB_DONE && j->port == port && j->dir == dir && j->stage == stage &&
	    j->epoch == epoch && same_pkt(&j->p, p)) {
		j->state = JOB_IDLE;
		__u32 id = j->rule_id;
		*rule_id = id;
		if (!j->action) {
			*allow = dir == DIR_OUT;  /* the defaults */
			return 1;
		}
		__u64 *hits = fw_hits.lookup(&id);
		if (hits)
			*hits += 1;
		*allow = j->action == FW_ALLOW;
		return 1;
	}
	j->p = *p;
	j->port = port;
	j->dir = dir;
	j->vni = vni;
	j->stage = stage;
	j->epoch = epoch;
	j->state = JOB_PENDING;
	return 0;
}

/* The eval program's work: answer the pending job. Returns the job's port
 * (0 if there was none), for the count of a failed tail call back. */
static __always_inline __u32 fw_answer(__u32 *dir)
{
	struct fw_job *j = fw_job_get();
	*dir = DIR_OUT;
	if (!j || j->state != JOB_PENDING)
		return 0;
	j->action = fw_eval(j->port, j->dir, &j->p, j->vni, &j->rule_id);
	j->state = JOB_DONE;
	*dir = j->dir;
	return j->port;
}

/* Tail-call the eval program (TC); it comes back to tc_port_out. */
static __always_inline int tc_fw_call(struct __sk_buff *skb, __u32 port, enum xde_dir dir)
{
	tc_progs.call(skb, PROG_FW_EVAL);
	return tc_drop(port, dir, DROP_tail_call);
}

#endif
