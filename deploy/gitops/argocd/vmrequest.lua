-- Argo CD health of a covi VmRequest (resource.customizations.health.covi.io_VmRequest).
-- Healthy when Fulfilled (or Expired: it did its job and is kept for the record),
-- Degraded when Denied or over quota, Suspended while it waits for an approver,
-- Progressing while its servers come up.
local hs = { status = "Progressing", message = "Waiting for covi" }
if obj.status == nil then return hs end
local function condition(t)
  if obj.status.conditions == nil then return nil end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == t then return c end
  end
  return nil
end
if obj.metadata.generation ~= nil and (obj.status.observedGeneration == nil or obj.status.observedGeneration < obj.metadata.generation) then
  hs.message = "Waiting for covi to observe generation " .. obj.metadata.generation
  return hs
end
local phase = obj.status.phase
local quota = condition("QuotaExceeded")
if phase == "Denied" then
  local c = condition("Denied")
  hs.status = "Degraded"
  hs.message = "Denied" .. (c ~= nil and (": " .. c.message) or "")
elseif quota ~= nil and quota.status == "True" then
  hs.status = "Degraded"
  hs.message = "QuotaExceeded: " .. quota.message
elseif phase == "Pending" then
  hs.status = "Suspended"
  hs.message = "Waiting for an approver"
elseif phase == "Fulfilled" or phase == "Expired" then
  hs.status = "Healthy"
  hs.message = phase
else
  hs.message = (obj.status.readyReplicas or 0) .. " of " .. obj.spec.replicas .. " servers Ready"
end
return hs
