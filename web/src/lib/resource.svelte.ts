// What every page that shows something from the API does: load it, keep the last good
// answer, say when it is loading or failed, and poll while the page is visible.

/** A value read from the API. `load()` again to refresh it; when loads overlap, only the
 * latest one's answer is kept. */
export function resource<T>(read: () => Promise<T>, initial: T) {
  const state = $state({ data: initial, loading: true, error: null as unknown });
  let generation = 0;
  async function load() {
    const mine = ++generation;
    try {
      const data = await read();
      if (mine === generation) {
        state.data = data;
        state.error = null;
      }
    } catch (e) {
      if (mine === generation) state.error = e;
    } finally {
      if (mine === generation) state.loading = false;
    }
  }
  return {
    get data() {
      return state.data;
    },
    get loading() {
      return state.loading;
    },
    get error() {
      return state.error;
    },
    load
  };
}

/** Calls `load` now, then every `ms` while the page is visible, until the component goes.
 * Call it while a component is being set up. */
export function poll(load: () => unknown, ms: number) {
  $effect(() => {
    load();
    const timer = setInterval(() => {
      if (document.visibilityState === 'visible') load();
    }, ms);
    return () => clearInterval(timer);
  });
}
