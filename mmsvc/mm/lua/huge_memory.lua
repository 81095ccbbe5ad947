-- mm/huge_memory.c: the record side of split_huge_page (spec §2.10, §3.9, S18).
--
-- The emulator keeps one struct page per THP (its head, aux = order); its tails exist only as
-- frames the head holds.  __split_huge_page gives each tail a record of its own here, in the
-- page program op {"split", head}; mm/huge_memory.py unmaps the THP before (migration
-- entries) and remaps the subpages after.

-- __split_huge_page_tail copies these flags from the head.  PG_mlocked and PG_unevictable are
-- copied too (5.17+): NR_MLOCK, counted nr on the head, is then one per PG_mlocked small page,
-- the same total.  PG_ANON and the mapping: page->mapping is copied to each tail.
local SPLIT_TAIL_FLAGS = nil

-- split_huge_page_records(head) -> tail indexes, for subpages 1 .. nr-1 in that order.
-- The head must be unmapped (unmap_folio left migration entries) and frozen.  Its frames
-- stay accounted ("used"): the head keeps one, each tail takes one of the others.
-- LRU (lru_add_page_tail / lru_add_split_folio, §2.10): a head isolated by reclaim or
-- migration puts each tail on the isolator's list (PG_ISOLATED and a reference of its own);
-- a head on the LRU links each tail next to it on the same list (an unevictable tail gets
-- mlock_count 0 and no link).  The list sizes, counted in pages, do not change.
-- Each tail also holds the split's reference (page_ref_unfreeze(tail, 1)), which
-- huge_memory.py drops after the remap: a subpage nobody maps again is freed then.  A file
-- THP's tail also holds the page cache's reference (page_ref_unfreeze(tail, 1 +
-- !PageAnon)): the cache slots are repointed by pc_split (filemap.lua).
local function split_huge_page_records(idx)
  if SPLIT_TAIL_FLAGS == nil then
    SPLIT_TAIL_FLAGS = bor(PG_REFERENCED, bor(PG_SWAPBACKED, bor(PG_MLOCKED, bor(PG_ACTIVE,
      bor(PG_LOCKED, bor(PG_UNEVICTABLE, bor(PG_DIRTY, bor(PG_ANON, bor(PG_ISOLATED,
      bor(PG_PAGECACHE, PG_UNEVICTABLE_MAPPING))))))))))
  end
  local head = pg(idx)
  if not has(head, PG_HEAD) then error('mmsvc: split of page ' .. idx .. ': not a THP') end
  if head.mapcount ~= 0 or bit.rshift(head.aux, AUX_PTEMAP_SHIFT) ~= 0 then
    error('mmsvc: split of THP ' .. idx .. ' while mapped')
  end
  if has(head, PG_SWAPCACHE) then error('mmsvc: split of THP ' .. idx .. ' in the swap cache') end
  local isolated, onlru = has(head, PG_ISOLATED), has(head, PG_LRU)
  if not isolated and not onlru then
    error('mmsvc: split of THP ' .. idx .. ' neither on the LRU nor isolated')
  end
  local nr = nr_pages(head)
  local lru = onlru and page_lru(head) or nil
  local tails = {}
  -- __split_huge_page: for (i = nr - 1; i >= 1; i--), each tail inserted just before the
  -- head (list_add_tail(&tail->lru, &head->lru)): head, 1, 2, ... from the old end
  for i = nr - 1, 1, -1 do
    local t = FREELIST_POP()
    local p = {flags = bor(PG_INUSE, band(head.flags, SPLIT_TAIL_FLAGS)), ref = 1, mapcount = 0,
               prev = -1, next = -1, mapping = head.mapping, index = head.index + i, aux = 0}
    if has(head, PG_PAGECACHE) then p.ref = 2 end
    if isolated then
      -- the split's reference and the isolator's (get_page(tail) onto the list)
      p.ref = p.ref + 1
    elseif lru == LRU_UNEVICTABLE then
      set(p, PG_LRU); p.prev = 0  -- "tail->mlock_count = 0"
    else
      set(p, PG_LRU)
      p.prev = head.prev; p.next = idx
      if head.prev >= 0 then local q = pg(head.prev); q.next = t; dirty(head.prev)
      else meta_set('h' .. lru, t) end
      head.prev = t
    end
    P[t] = p
    dirty(t)
    tails[i] = t
  end
  clr(head, bor(PG_HEAD, PG_FROZEN))  -- the head is a small page now; page_ref_unfreeze
  head.aux = 0
  dirty(idx)
  return tails
end
